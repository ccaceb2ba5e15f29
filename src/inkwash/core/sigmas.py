"""Step schedules: builders that return a descending float64 tensor of sigmas ending in 0.

``steps`` always means sampler steps; the tensor has ``steps + 1`` entries. Samplers read
``sigmas[i]`` and ``sigmas[i + 1]`` and never recompute neighbours from step counts.
"""

from __future__ import annotations

import math

import torch

from inkwash.core.schedule import NoiseSchedule

STEP_SCHEDULES = ("uniform", "leading", "trailing", "karras", "exponential")


def validate_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Check a user-supplied step schedule: 1-D, finite, >= 0 and strictly decreasing (a repeated
    sigma is a zero-length step, which the multistep samplers cannot divide by)."""
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError("sigmas must be a non-empty 1-D tensor")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError("sigmas must be finite and >= 0")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing")
    return sigmas


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def timesteps_for(schedule: NoiseSchedule, steps: int, spacing: str, offset: int = 0) -> torch.Tensor:
    """Descending integer timesteps for the three spacings of Lin et al. 2023, Table 2. ``offset`` shifts the
    "leading" timesteps up (diffusers' ``steps_offset``: Stable Diffusion's 1 gives 981, 961, ..., 1 for 50
    steps); the other spacings ignore it, as diffusers' schedulers do."""
    T = schedule.num_steps
    if spacing == "uniform":  # "linspace": evenly spaced over [0, T-1], rounded
        t = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
    elif spacing == "leading":  # multiples of T // steps, starting at 0
        t = torch.arange(steps, dtype=torch.float64) * (T // steps) + offset
        if t[-1] > T - 1:
            raise ValueError(f"{steps} leading steps with offset {offset} pass the last timestep {T - 1}")
    elif spacing == "trailing":  # counted back from T, so the first step is always T-1
        t = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return t.flip(0).long()


def build_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    kind: str = "trailing",
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """A (steps + 1,) descending float64 sigma tensor ending in 0 for the named step schedule; ``offset`` is
    the "leading" spacing's timestep offset (``timesteps_for``)."""
    if kind not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {kind!r}; choose from {', '.join(STEP_SCHEDULES)}")
    T = schedule.num_steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    if kind in ("uniform", "leading", "trailing"):
        return _append_zero(schedule.sigmas[timesteps_for(schedule, steps, kind, offset)])
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    if steps == 1:
        return _append_zero(torch.tensor([hi], dtype=torch.float64))
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if kind == "karras":
        # Karras et al. 2022, Eq. 5.
        inv_rho = 1.0 / rho
        sigmas = (hi**inv_rho + ramp * (lo**inv_rho - hi**inv_rho)) ** rho
    else:  # exponential: evenly spaced in log-sigma
        sigmas = torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))
    return _append_zero(sigmas)
