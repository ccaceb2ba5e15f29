"""Single-step ODE/SDE samplers in sigma: Euler (with churn), Euler a, Heun, DPM2 and DPM2 a."""

from __future__ import annotations

import math

import torch

from inkwash.core.denoiser import Denoiser
from inkwash.sampling.samplers.common import Callback, NoiseFn, ancestral_step, churn, denoise, noise_fn, report, to_d


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE, with Karras et al. 2022's churn (Algorithm 2)."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    steps = len(values) - 1
    for i in range(steps):
        sigma, sigma_next = values[i], values[i + 1]
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
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
    """Ancestral Euler ("Euler a"): an Euler step down to sigma_down, then fresh noise sigma_up."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + s_noise * sigma_up * noise()
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to 0."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    steps = len(values) - 1
    for i in range(steps):
        sigma, sigma_next = values[i], values[i + 1]
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        d = to_d(x, sigma_hat, denoised)
        x_euler = x + d * (sigma_next - sigma_hat)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, denoise(denoiser, x_euler, sigma_next, cond))
            x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 in sigma (Lu et al. 2022, Algorithm 4, as in k-diffusion): a midpoint step
    whose midpoint is the geometric mean of the two sigmas."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    steps = len(values) - 1
    for i in range(steps):
        sigma, sigma_next = values[i], values[i + 1]
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * sigma_next)
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = to_d(x_mid, sigma_mid, denoise(denoiser, x_mid, sigma_mid, cond))
            x = x + d_mid * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
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
    """Ancestral DPM-Solver-2 ("DPM2 a"): a DPM2 step down to sigma_down, then fresh noise."""
    noise = noise_fn(noise, x)
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = to_d(x_mid, sigma_mid, denoise(denoiser, x_mid, sigma_mid, cond))
            x = x + d_mid * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + s_noise * sigma_up * noise()
    return x
