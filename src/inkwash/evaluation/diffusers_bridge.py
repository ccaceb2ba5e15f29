"""diffusers' schedulers run beside inkwash's samplers: the harness shared by tests/test_diffusers_agreement.py
(step-by-step agreement) and benchmarks/samplers.py (accuracy at equal NFE).

A scheduler is built on one of inkwash's noise schedules, optionally with inkwash's float64 tables in place of
its float32 ones, and driven by a pipeline's sampling loop with an epsilon "network" ``eps(x_vp, t)``;
inkwash's samplers get a noise source that replays the draws the scheduler makes.

diffusers is optional (the ``test`` and ``bench`` extras): this module never imports it. Callers pass the
scheduler class, so ``import inkwash`` works without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from inkwash.core.schedule import NoiseSchedule

# inkwash's beta schedule name -> diffusers' name for the same betas
DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def diffusers_scheduler(cls: type, schedule: NoiseSchedule, *, float64: bool = True, **config):
    """A diffusers scheduler of class ``cls`` on ``schedule`` (its T and betas), with ``config`` passed on.

    With ``float64`` its beta / alpha tables are inkwash's float64 ones: the same values as its own float32
    tables to float32 precision, with float64 arithmetic."""
    sched = cls(
        num_train_timesteps=schedule.num_steps,
        beta_start=schedule.config.beta_start,
        beta_end=schedule.config.beta_end,
        beta_schedule=DIFFUSERS_BETA_SCHEDULE[schedule.config.beta_schedule],
        **config,
    )
    if float64:
        sched.betas = schedule.betas.clone()
        sched.alphas = schedule.alphas.clone()
        sched.alphas_cumprod = schedule.alpha_bar.clone()
        if hasattr(sched, "final_alpha_cumprod"):  # DDIM, PNDM
            one = torch.tensor(1.0, dtype=torch.float64)
            sched.final_alpha_cumprod = one if sched.config.set_alpha_to_one else sched.alphas_cumprod[0]
    return sched


def set_timesteps(sched, steps: int, *, float64: bool = True) -> None:
    """``sched.set_timesteps(steps)``; with ``float64`` its sigma table (where it has one) is upcast: the same
    float32 values, float64 arithmetic."""
    sched.set_timesteps(steps)
    if float64 and isinstance(getattr(sched, "sigmas", None), torch.Tensor):
        sched.sigmas = sched.sigmas.double()


def run_scheduler(
    sched,
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    callback: Callable[[object, torch.Tensor], None] | None = None,
    **step_kwargs,
) -> torch.Tensor:
    """A diffusers pipeline's sampling loop from ``x`` (already scaled by the first sigma, e.g. by
    ``sched.init_noise_sigma``), with ``eps(scale_model_input(x, t), t)`` as the network; returns the sample.

    ``callback(sched, x)`` sees the state before each call of ``step``, inner evaluations (Heun, KDPM2,
    PNDM) included; ``step_kwargs`` go to every ``step`` (``eta``, ``generator``, ...)."""
    for t in sched.timesteps:
        if callback is not None:
            callback(sched, x)
        model_output = eps(sched.scale_model_input(x, t), t)
        x = sched.step(model_output, t, x, **step_kwargs).prev_sample
    return x


def diffusers_noise(
    generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> Callable[[], torch.Tensor]:
    """A noise source for inkwash's samplers that draws, in order, what a scheduler's ``step`` draws from
    ``generator``: diffusers' ``randn_tensor`` is ``torch.randn(shape, generator=generator, dtype=dtype)``.
    Returned as float64."""
    return lambda: torch.randn(shape, generator=generator, dtype=dtype).double()
