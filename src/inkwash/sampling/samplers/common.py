"""Small helpers shared by the samplers: noise, denoiser calls, derivatives and ancestral splits."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from inkwash.core.denoiser import Denoiser

NoiseFn = Callable[[], torch.Tensor]
Callback = Callable[[dict], None]


def noise_fn(noise: NoiseFn | None, x: torch.Tensor) -> NoiseFn:
    """The caller's noise source, or fresh ``torch.randn_like`` draws."""
    return noise if noise is not None else (lambda: torch.randn_like(x))


def denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
    """Call the denoiser at one sigma for the whole batch."""
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device), cond)


def report(callback: Callback | None, i: int, x, sigma: float, sigma_next: float, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x)) / sigma (Karras et al. 2022, Eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part (sigma_down) and fresh noise
    (sigma_up); DDIM's sigma_t(eta) (Song et al. 2021, Eq. 16) in the x0 + sigma*eps form."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def churn(
    x: torch.Tensor,
    sigma: float,
    steps: int,
    noise: NoiseFn,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[torch.Tensor, float]:
    """Raise the noise level to sigma_hat and add the matching fresh noise (Karras et al. 2022,
    Algorithm 2, lines 4-6); a no-op when s_churn is 0 or sigma is outside [s_tmin, s_tmax]."""
    gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1.0 + gamma)
    if sigma_hat > sigma:
        x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise()
    return x, sigma_hat


def log_lambda(sigma: float) -> float:
    """Half log-SNR lambda = -log(sigma), the time variable of DPM-Solver (Lu et al. 2022)."""
    return -math.log(sigma)
