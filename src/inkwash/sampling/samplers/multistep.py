"""Multistep samplers that reuse earlier model evaluations: LMS, PLMS, DPM++ 2M and UniPC."""

from __future__ import annotations

import math

import numpy as np
import torch

from inkwash.core.denoiser import Denoiser
from inkwash.sampling.samplers.common import Callback, NoiseFn, denoise, log_lambda, report, to_d


def lms_coefficient(points: list[float], j: int, lo: float, hi: float) -> float:
    """Integral from lo to hi of the j-th Lagrange basis polynomial through ``points``."""
    basis = np.polynomial.Polynomial([1.0])
    for k, point in enumerate(points):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-point, 1.0]) / (points[j] - point)
    antiderivative = basis.integ()
    return float(antiderivative(hi) - antiderivative(lo))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep in sigma: Adams-Bashforth with variable steps, the coefficients being
    exact integrals of the Lagrange polynomials through the previous sigmas (k-diffusion's LMS)."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    values = sigmas.tolist()
    derivatives: list[torch.Tensor] = []  # newest first
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        derivatives.insert(0, to_d(x, sigma, denoised))
        del derivatives[order:]
        points = values[i - len(derivatives) + 1 : i + 1][::-1]  # sigma_i, sigma_{i-1}, ...
        for j, d in enumerate(derivatives):
            x = x + lms_coefficient(points, j, sigma, sigma_next) * d
    return x


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM, Eq. 12): fourth-order Adams-Bashforth on
    epsilon with DDIM's transfer. The first step is a Heun-like pair of evaluations, as in the
    latent-diffusion PLMS and diffusers' PNDM with skip_prk_steps, so it uses steps + 1 NFE."""
    values = sigmas.tolist()
    history: list[torch.Tensor] = []  # epsilons, oldest first
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        eps = to_d(x, sigma, denoised)  # in the x0 + sigma*eps form, epsilon is dx/dsigma
        if not history:
            if sigma_next > 0:
                x_next = x + eps * (sigma_next - sigma)
                eps_prime = (eps + to_d(x_next, sigma_next, denoise(denoiser, x_next, sigma_next, cond))) / 2
            else:
                eps_prime = eps
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = [*history[-2:], eps]
        x = x + eps_prime * (sigma_next - sigma)  # DDIM's transfer is an Euler step in sigma
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): second-order multistep in the data
    prediction, first order on the first step and on the final step to sigma = 0."""
    values = sigmas.tolist()
    old_denoised, h_last = None, None
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = log_lambda(sigma_next) - log_lambda(sigma)
        estimate = denoised
        if old_denoised is not None:
            r = h_last / h
            estimate = denoised + (denoised - old_denoised) / (2 * r)
        x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        old_denoised, h_last = denoised, h
    return x


def _unipc_coefficients(
    rks: list[float], hh: float, order: int, variant: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The R matrix, b vector and B(h) of UniPC (Zhao et al. 2023, Algorithm 1 and Sec. 3.3)."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    r = torch.tensor(rks, dtype=torch.float64)
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.stack(rows), torch.tensor(b, dtype=torch.float64), b_h


def _unipc_update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, torch.Tensor]],
    order: int,
    variant: str,
    model_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP predictor step (model_next is None) or UniC corrector step from sigma to
    sigma_next, using the data predictions in ``history`` (newest last)."""
    lambda_s0 = log_lambda(sigma)
    h = log_lambda(sigma_next) - lambda_s0
    m0 = history[-1][1]
    hh = -h  # data-prediction form
    rks, d1s = [], []
    for k in range(1, order):
        sigma_k, m_k = history[-(k + 1)]
        rk = (log_lambda(sigma_k) - lambda_s0) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    R, b, b_h = _unipc_coefficients(rks, hh, order, variant)
    x_next = (sigma_next / sigma) * x - math.expm1(hh) * m0
    if model_next is None:
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_next = x_next - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
        return x_next
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_next - b_h * (correction + rhos[-1] * (model_next - m0))


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the UniP predictor of the given order with the UniC corrector
    applied after each model evaluation, in the data prediction; B(h) = h ("bh1") or e^h - 1 ("bh2")."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    values = sigmas.tolist()
    steps = len(values) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, denoised), newest last
    last = None  # (x before the previous predictor step, its order)
    for i in range(steps):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if corrector and last is not None:
            x_prev, used_order = last
            x = _unipc_update(x_prev, values[i - 1], sigma, history, used_order, variant, model_next=denoised)
        history = [*history[-(order - 1) :], (sigma, denoised)] if order > 1 else [(sigma, denoised)]
        this_order = min(order, len(history), steps - i if lower_order_final else order)
        last = (x, this_order)
        # The limit of every order as sigma_next -> 0 is the data prediction itself.
        x = denoised if sigma_next == 0 else _unipc_update(x, sigma, sigma_next, history, this_order, variant)
    return x
