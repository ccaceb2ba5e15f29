"""The training objective: the seed's noising step and the regression onto the network's target,
with optional Min-SNR-gamma weighting, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from inkwash.core.schedule import NoiseSchedule

LR_SCHEDULES = ("constant", "cosine")


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto: the noise (Ho et al. 2020), the clean image, or
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022). alpha_bar is (B, 1, ...)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 9 and its eps / v forms).

    The x0-space weight is min(snr, gamma). The eps-MSE equals snr times the x0-MSE, so an eps
    target takes min(snr, gamma) / snr; a v target, whose MSE is (snr + 1) times the x0-MSE, takes
    min(snr, gamma) / (snr + 1).
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    *,
    labels: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    input_perturbation: float = 0.0,
    augment_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-6 of the seed: t uniform over the T steps, Gaussian noise, x_t in closed form, and
    the (optionally Min-SNR weighted) mean squared error between the network's output and its target.
    ``labels`` (B,) are passed to the network as its class condition, and ``augment_labels`` (B, D), the
    augmentation each image of ``x0`` went through (``data.augment``), as a keyword.

    ``input_perturbation`` gamma > 0 noises x_t with ``noise + gamma * xi`` (xi a second Gaussian draw)
    while the target keeps ``noise`` (Ning et al. 2023, DDPM-IP; diffusers' training examples'
    ``--input_perturbation``). The network then trains on inputs a little off the forward process,
    as its own samples are at sampling time (exposure bias); 0.1 is their choice."""
    device = x0.device
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)  # (B, C, H, W)
    if input_perturbation > 0:
        extra = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)  # (B, C, H, W)
        x_t = schedule.q_sample(x0, t, noise + input_perturbation * extra)
    else:
        x_t = schedule.q_sample(x0, t, noise)
    alpha_bar = schedule.alpha_bar.to(device)[t]  # (B,) float64
    target = prediction_target(prediction, x0, noise, alpha_bar.to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1)))
    inputs = (x_t, t.float()) if labels is None else (x_t, t.float(), labels)
    output = model(*inputs) if augment_labels is None else model(*inputs, augment_labels=augment_labels)
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    snr = alpha_bar / (1 - alpha_bar)
    return (per_sample * min_snr_weight(snr, min_snr_gamma, prediction).float()).mean()


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based): a linear warm-up to ``peak``, then
    constant or a half-cosine decay to zero at ``total_steps`` (Loshchilov & Hutter 2017, no restarts)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
