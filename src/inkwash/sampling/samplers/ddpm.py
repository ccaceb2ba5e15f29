"""DDPM and DDIM, written in the x0 + sigma * eps form."""

from __future__ import annotations

import math

import torch

from inkwash.core.denoiser import Denoiser
from inkwash.sampling.samplers.common import Callback, NoiseFn, ancestral_step, denoise, noise_fn, report


def _alpha_bar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


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
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
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
    clip_range: float | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta; eta = 1 is DDPM's posterior.

    ``clip_range`` r clips the predicted x0 to [-r, r] but keeps the network's own noise estimate
    for the direction to x_t, as diffusers' ``DDIMScheduler(clip_sample=True)`` does by default
    (``use_clipped_model_output=False``). A denoiser that clips its own output instead (``ClampedDenoiser``)
    gives the noise re-derived from the clipped x0 (guided-diffusion's DDIM), which pushes what the clip
    removed back into x_t; docs/experiments.md (the unconditional recipe) has what that costs in FID."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        raw = denoise(denoiser, x, sigma, cond)
        denoised = raw if clip_range is None else raw.clamp(-clip_range, clip_range)
        report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = (x - raw) / sigma
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * noise()
    return x
