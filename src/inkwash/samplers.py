"""Samplers: short pure functions over a descending sigma tensor that ends in 0.

Every sampler has the form ``sample_x(denoiser, x, sigmas, *, noise=None, callback=None,
cond=None, **options) -> x0``. ``x`` is the initial state at ``sigmas[0]`` in the denoiser's
convention ``x = x0 + sigma * eps``; ``noise`` is a callable returning fresh standard normal
noise shaped like x (defaults to ``torch.randn_like``); ``callback`` receives a dict with
``i``, ``x``, ``sigma``, ``sigma_next`` and ``denoised`` after each model evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import Denoiser

NoiseFn = Callable[[], torch.Tensor]
Callback = Callable[[dict], None]


def _noise_fn(noise: NoiseFn | None, x: torch.Tensor) -> NoiseFn:
    return noise if noise is not None else (lambda: torch.randn_like(x))


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device), cond)


def _alpha_bar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part (sigma_down) and fresh noise
    (sigma_up); this is DDIM's sigma_t(eta) (Song et al. 2021, Eq. 16) in the x0 + sigma*eps form."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(
        sigma_next,
        eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2),
    )
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    variance: str = "beta_tilde",
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; respaced as in Nichol & Dhariwal
    2021). ``variance`` is ``beta_tilde`` (the posterior's) or ``beta`` (sigma_t^2 = beta_t)."""
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"variance must be 'beta_tilde' or 'beta', got {variance!r}")
    noise = _noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = _denoise(denoiser, x, sigma, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        alpha_bar, alpha_bar_next = _alpha_bar(sigma), _alpha_bar(sigma_next)
        alpha = alpha_bar / alpha_bar_next  # alpha_t of the respaced chain
        beta = 1.0 - alpha
        # Posterior mean (Eq. 7) divided by sqrt(alpha_bar_next) to stay in x0 + sigma*eps form.
        x = (beta / (1 - alpha_bar)) * denoised + (alpha * (1 - alpha_bar_next) / (1 - alpha_bar)) * x
        if sigma_next > 0:
            var = beta * (1 - alpha_bar_next) / (1 - alpha_bar) if variance == "beta_tilde" else beta
            x = x + math.sqrt(var / alpha_bar_next) * noise()
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta; eta = 1 is DDPM's posterior."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    noise = _noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = _denoise(denoiser, x, sigma, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = (x - denoised) / sigma
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * noise()
    return x


@dataclass(frozen=True)
class SamplerInfo:
    id: str
    display_name: str
    fn: Callable[..., torch.Tensor]
    order: int
    stochastic: bool
    nfe_per_step: int


SAMPLERS: dict[str, SamplerInfo] = {
    info.id: info
    for info in (
        SamplerInfo("ddpm", "DDPM", sample_ddpm, 1, True, 1),
        SamplerInfo("ddim", "DDIM", sample_ddim, 1, False, 1),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """Look a sampler up by its id or its WebUI display name (case-insensitive)."""
    key = name.strip().lower()
    for info in SAMPLERS.values():
        if key in (info.id, info.display_name.lower()):
            return info
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
