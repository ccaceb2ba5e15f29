"""The denoiser contract: ``D(x, sigma, cond=None) -> x0_hat`` with ``x = x0 + sigma * eps``.

Samplers, losses, guidance and evaluation only ever call a denoiser. A DDPM epsilon-prediction
network becomes one through ``EpsDenoiser`` (k-diffusion's ``DiscreteEpsDDPMDenoiser``; EDM's
``VPPrecond``): the network sees the variance-preserving input ``x / sqrt(1 + sigma^2)`` and the
(possibly fractional) timestep whose sigma matches.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .schedule import NoiseSchedule


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a (B,) float64 tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


class EpsDenoiser(nn.Module):
    """Wraps an epsilon-prediction network and its noise schedule into ``D(x, sigma, cond)``."""

    def __init__(self, network: nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule

    def predict_eps(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's noise estimate at a denoiser-space input x = x0 + sigma * eps."""
        sigma = _per_sample(sigma, x)  # (B,)
        c_in = (1.0 / (1.0 + sigma**2).sqrt()).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        t = self.schedule.sigma_to_t(sigma.cpu()).to(device=x.device, dtype=torch.float32)
        dtype = next(self.network.parameters(), x).dtype
        return self.network((x * c_in).to(dtype), t, cond).to(x.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        eps = self.predict_eps(x, sigma, cond)
        sigma = _per_sample(sigma, x).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x - sigma * eps  # (B, C, H, W)


class ClampedDenoiser:
    """Clip the denoised estimate to the data range at every step, as DDPM and DDIM do by default
    (Ho et al. 2020's ``clip_denoised``; diffusers' ``clip_sample``)."""

    def __init__(self, denoiser: Denoiser, low: float = -1.0, high: float = 1.0) -> None:
        self.denoiser, self.low, self.high = denoiser, low, high

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, cond).clamp(self.low, self.high)
