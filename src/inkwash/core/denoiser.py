"""The denoiser contract: ``D(x, sigma, cond=None) -> x0_hat`` with ``x = x0 + sigma * eps``.

Samplers, losses, guidance and evaluation only ever call a denoiser. A DDPM epsilon-prediction
network becomes one through ``ModelDenoiser`` (k-diffusion's ``DiscreteEpsDDPMDenoiser``; EDM's
``VPPrecond``): the network sees the variance-preserving input ``x / sqrt(1 + sigma^2)`` and the
(possibly fractional) timestep whose sigma matches.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from inkwash.core.precision import precision_context, resolve_precision
from inkwash.core.schedule import NoiseSchedule


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a (B,) float64 tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


PREDICTIONS = ("eps", "x0", "v")


class ModelDenoiser(nn.Module):
    """Wraps a network trained on the discrete schedule into ``D(x, sigma, cond)``.

    ``prediction`` says what the network's output means: ``eps`` (the noise, Ho et al. 2020),
    ``x0`` (the clean image) or ``v`` (sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho
    2022). The network always sees the variance-preserving input x / sqrt(1 + sigma^2) and the
    (possibly fractional) timestep whose sigma matches.
    """

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        self.network = network
        self.schedule = schedule
        self.prediction = prediction

    def network_output(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The raw network output at a denoiser-space input x = x0 + sigma * eps."""
        sigma = _per_sample(sigma, x)  # (B,)
        c_in = (1.0 / (1.0 + sigma**2).sqrt()).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        t = self.schedule.sigma_to_t(sigma.cpu()).to(device=x.device, dtype=torch.float32)
        dtype = next(self.network.parameters(), x).dtype
        return self.network((x * c_in).to(dtype), t, cond).to(x.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.network_output(x, sigma, cond)
        sigma = _per_sample(sigma, x).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        if self.prediction == "eps":
            return x - sigma * out  # (B, C, H, W)
        if self.prediction == "x0":
            return out
        # v: x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, with x_t = x / sqrt(1 + sigma^2).
        return x / (1 + sigma**2) - sigma / (1 + sigma**2).sqrt() * out


class ClampedDenoiser:
    """Clip the denoised estimate to the data range at every step, as DDPM and DDIM do by default
    (Ho et al. 2020's ``clip_denoised``; diffusers' ``clip_sample``)."""

    def __init__(self, denoiser: Denoiser, low: float = -1.0, high: float = 1.0) -> None:
        self.denoiser, self.low, self.high = denoiser, low, high

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, cond).clamp(self.low, self.high)


class PlacedDenoiser:
    """Run a denoiser on ``device`` under ``precision``, and hand its answer back where the input lives.

    ``bf16`` and ``fp16`` autocast the network's convolutions and matrix products (as diffusers'
    ``torch_dtype=torch.float16`` pipelines do, but with the normalizations kept in fp32); the
    sampler's own arithmetic stays in the input's dtype, so the step formulas lose nothing. The
    input may live elsewhere (bits/dim runs in float64 on the CPU): it is moved to ``device`` and the
    output is moved back, and cast to the input's dtype if it came back in bf16 or fp16.
    """

    def __init__(self, denoiser: Denoiser, device: torch.device | str = "cpu", precision: str = "fp32") -> None:
        self.denoiser = denoiser
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        here = x.to(self.device)
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(self.device)
        if cond is not None:
            cond = cond.to(self.device)
        with precision_context(self.precision, self.device):
            out = self.denoiser(here, sigma, cond)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.to(x.dtype)  # a denoiser that answers in the autocast dtype
        return out.to(x.device)
