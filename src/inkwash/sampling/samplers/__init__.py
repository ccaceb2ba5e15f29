"""Samplers: short pure functions over a descending sigma tensor that ends in 0.

Every sampler has the form ``sample_x(denoiser, x, sigmas, *, noise=None, callback=None,
cond=None, **options) -> x0``. ``x`` is the initial state at ``sigmas[0]`` in the denoiser's
convention ``x = x0 + sigma * eps``; ``noise`` is a callable returning fresh standard normal
noise shaped like x (defaults to ``torch.randn_like``); ``callback`` receives a dict with
``i``, ``x``, ``sigma``, ``sigma_next`` and ``denoised`` after each step's first model evaluation.
The registry maps both the snake_case id and the WebUI display name to the function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from inkwash.sampling.samplers.common import ancestral_step, to_d
from inkwash.sampling.samplers.ddpm import sample_ddim, sample_ddpm
from inkwash.sampling.samplers.dpmpp import (
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from inkwash.sampling.samplers.euler import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from inkwash.sampling.samplers.multistep import sample_dpmpp_2m, sample_lms, sample_plms, sample_unipc


@dataclass(frozen=True)
class SamplerInfo:
    id: str
    display_name: str
    fn: Callable[..., torch.Tensor]
    order: int  # order of accuracy of the deterministic part
    stochastic: bool  # injects fresh noise at each step by default
    nfe_per_step: int  # model evaluations per step (the last step to sigma = 0 may use fewer)
    default_schedule: str  # the step schedule used when none is named (see the README's table)
    note: str = ""
    # Clips x0 itself through a ``clip_range`` argument and keeps the network's own noise estimate (DDIM,
    # as diffusers' DDIM does); the others get a clamped denoiser when clipping is asked for.
    own_clip: bool = False


SAMPLERS: dict[str, SamplerInfo] = {
    info.id: info
    for info in (
        SamplerInfo("ddpm", "DDPM", sample_ddpm, 1, True, 1, "leading"),
        SamplerInfo("ddim", "DDIM", sample_ddim, 1, False, 1, "leading", "stochastic when eta > 0", own_clip=True),
        SamplerInfo("euler", "Euler", sample_euler, 1, False, 1, "leading", "stochastic with s_churn > 0"),
        SamplerInfo("euler_ancestral", "Euler a", sample_euler_ancestral, 1, True, 1, "leading"),
        SamplerInfo("heun", "Heun", sample_heun, 2, False, 2, "leading", "one evaluation on the last step"),
        SamplerInfo("dpm_2", "DPM2", sample_dpm_2, 2, False, 2, "leading", "one evaluation on the last step"),
        SamplerInfo("dpm_2_ancestral", "DPM2 a", sample_dpm_2_ancestral, 2, True, 2, "trailing"),
        SamplerInfo("lms", "LMS", sample_lms, 4, False, 1, "trailing"),
        SamplerInfo("plms", "PLMS", sample_plms, 4, False, 1, "leading", "one extra evaluation on the first step"),
        SamplerInfo("dpmpp_2s_ancestral", "DPM++ 2S a", sample_dpmpp_2s_ancestral, 2, True, 2, "exponential"),
        SamplerInfo("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, 2, False, 1, "exponential"),
        SamplerInfo("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde, 2, True, 2, "exponential"),
        SamplerInfo("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, 2, True, 1, "trailing"),
        SamplerInfo("dpmpp_3m_sde", "DPM++ 3M SDE", sample_dpmpp_3m_sde, 3, True, 1, "trailing"),
        SamplerInfo(
            "unipc", "UniPC", sample_unipc, 3, False, 1, "exponential", "order-2 predictor with the UniC corrector"
        ),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """Look a sampler up by its id or its WebUI display name (case-insensitive)."""
    key = name.strip().lower()
    for info in SAMPLERS.values():
        if key in (info.id, info.display_name.lower()):
            return info
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


__all__ = [
    "SAMPLERS",
    "SamplerInfo",
    "ancestral_step",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
    "to_d",
]
