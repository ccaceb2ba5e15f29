"""Stochastic DPM-Solver++ samplers: DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE and DPM++ 3M SDE.

All work in lambda = -log(sigma) with the data prediction (Lu et al. 2022b). The SDE variants
inject fresh Gaussian noise from the ``noise`` callable at every step.
"""

from __future__ import annotations

import math

import torch

from inkwash.core.denoiser import Denoiser
from inkwash.sampling.samplers.common import (
    Callback,
    NoiseFn,
    ancestral_step,
    denoise,
    log_lambda,
    noise_fn,
    report,
    to_d,
)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r = 1/2), then fresh noise."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = log_lambda(sigma_down) - log_lambda(sigma)
            sigma_mid = sigma * math.exp(-h / 2)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_mid = denoise(denoiser, x_mid, sigma_mid, cond)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_mid
        if sigma_up > 0:
            x = x + s_noise * sigma_up * noise()
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's "DPM++ SDE"): a two-stage stochastic step, the intermediate
    point at lambda + r*h, each stage with an ancestral noise split."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        h = log_lambda(sigma_next) - log_lambda(sigma)
        sigma_s = sigma * math.exp(-r * h)
        # Stage 1: to lambda + r*h.
        # The two stages' noises are the Brownian increments (in sigma) over [sigma_s, sigma] and
        # [sigma_next, sigma], normalised: the second contains the first, so they are correlated
        # (the joint law of k-diffusion's Brownian-tree noise).
        z_s = noise()
        corr = math.sqrt((sigma - sigma_s) / (sigma - sigma_next))
        z_next = corr * z_s + math.sqrt(1 - corr**2) * noise()
        sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
        x_s = (sigma_down / sigma) * x - math.expm1(log_lambda(sigma) - log_lambda(sigma_down)) * denoised
        x_s = x_s + s_noise * sigma_up * z_s
        denoised_s = denoise(denoiser, x_s, sigma_s, cond)
        # Stage 2: the full step with the blended data prediction.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        fac = 1 / (2 * r)
        blended = (1 - fac) * denoised + fac * denoised_s
        x = (sigma_down / sigma) * x - math.expm1(log_lambda(sigma) - log_lambda(sigma_down)) * blended
        x = x + s_noise * sigma_up * z_next
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Appendix; k-diffusion's "DPM++ 2M SDE")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = noise_fn(noise, x)
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
        eta_h = eta * h
        phi_1 = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi_1 * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (phi_1 / (-h - eta_h) + 1) * (denoised - old_denoised) / r
            else:
                x = x + 0.5 * phi_1 * (denoised - old_denoised) / r
        if eta > 0:
            x = x + s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * noise()
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's "DPM++ 3M SDE"): third-order multistep in the data
    prediction with the exponential-integrator noise term."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = log_lambda(sigma_next) - log_lambda(sigma)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta > 0:
            x = x + s_noise * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * noise()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
