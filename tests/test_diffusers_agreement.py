"""Step-by-step agreement of inkwash's samplers with the diffusers schedulers.

Both sides are driven by one deterministic, nonlinear epsilon "network" defined on the
variance-preserving (DDPM) state and by the same noise. diffusers draws its noise with
``randn_tensor``, i.e. ``torch.randn(shape, generator=g)``, so inkwash's ``noise`` callable draws
from an identically seeded generator, in the same order. inkwash sees the network through
``ModelDenoiser`` (``D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))``), so the tests
also check that ``t(sigma)`` lands on the timestep that diffusers hands the network. Every state
the network sees is compared, not only the final sample.

Precision: diffusers builds its tables in float32. The tests give its schedulers inkwash's
float64 tables (the two agree to float32 precision, see ``test_schedule_tables_match_diffusers``),
upcast diffusers' float32 sigma tables after ``set_timesteps`` (same values, float64 arithmetic)
and give inkwash exactly those sigmas. DDPM, DDIM and PNDM then agree to ~1e-14. Elsewhere some
float32 rounding is left: the sigmas are float32 values, so t(sigma) lands ~1e-6 off the integer
timestep (and ``ModelDenoiser`` hands the network t as float32): ~1e-8 (Heun, LMS, UniPC, KDPM2,
which also computes its midpoints in float32); Euler, Euler a and DPM-Solver++ also cast the
sample to float32 inside ``step``: ~2e-7. Tolerances are 1e-12, 5e-7 and 2e-6 respectively.
LMS's coefficients come from scipy's quad with epsrel=1e-4, but quad is exact for the cubic
Lagrange polynomials, so LMS needs no looser tolerance.

Where diffusers departs from the published algorithm, one test asserts that inkwash follows the
algorithm, and a second one, marked ``xfail(strict=False)`` and citing the diffusers lines, asserts
that diffusers agrees with it. So the bug is on record (xfailed), and when upstream fixes it the
test starts to pass (xpassed) without turning CI red and without any change to inkwash.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from inkwash.core.denoiser import ClampedDenoiser, ModelDenoiser
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import build_sigmas, timesteps_for
from inkwash.evaluation.diffusers_bridge import diffusers_noise, diffusers_scheduler, run_scheduler, set_timesteps
from inkwash.sampling.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")
# diffusers feeds torch tensors to numpy, which warns thousands of times; recording those is slow.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Bound here so that their (slow, scipy-importing) lazy imports happen at collection, not in a test.
DDPMScheduler = diffusers.DDPMScheduler
DDIMScheduler = diffusers.DDIMScheduler
PNDMScheduler = diffusers.PNDMScheduler
EulerDiscreteScheduler = diffusers.EulerDiscreteScheduler
EulerAncestralDiscreteScheduler = diffusers.EulerAncestralDiscreteScheduler
HeunDiscreteScheduler = diffusers.HeunDiscreteScheduler
KDPM2DiscreteScheduler = diffusers.KDPM2DiscreteScheduler
LMSDiscreteScheduler = diffusers.LMSDiscreteScheduler
DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler
UniPCMultistepScheduler = diffusers.UniPCMultistepScheduler

SHAPE = (2, 3, 4, 4)
LINEAR = NoiseSchedule(ScheduleConfig("linear", 1000, 1e-4, 0.02))  # DDPM
SD = NoiseSchedule(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))  # Stable Diffusion
COSINE = NoiseSchedule(ScheduleConfig("cosine", 1000))


class FakeEps(nn.Module):
    """A deterministic nonlinear epsilon "network" on the VP state ``x`` at timestep ``t``.

    The exact noise prediction for N(0, 0.5 I) data plus a t-dependent tanh term (whose effect
    on x0 stays below 0.6), so every sampler's output depends on the network's nonlinearity and
    on the timestep it is given. ``round_t`` rounds the timestep first; ``t_shift`` offsets it.
    """

    def __init__(self, schedule: NoiseSchedule, *, round_t: bool = False, t_shift: float = 0.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        dim = math.prod(SHAPE[1:])
        self.register_buffer("weight", torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5)
        self.register_buffer("bias", 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64))
        self.schedule = schedule
        self.round_t = round_t
        self.t_shift = t_shift

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(batch)
        if self.round_t:
            t = t.round()
        t = t + self.t_shift
        alpha_bar = 1.0 / (1.0 + self.schedule.t_to_sigma(t) ** 2)  # (B,)
        flat = x.double().reshape(batch, -1)
        gauss = ((1 - alpha_bar).sqrt() / (0.5 * alpha_bar + 1 - alpha_bar))[:, None] * flat
        wiggle = (1 + 0.5 * torch.sin(t / 37))[:, None]
        mixed = (flat[:, None, :] * self.weight).sum(-1) + self.bias  # flat @ weight.T, without BLAS overhead
        extra = 0.4 * alpha_bar.sqrt()[:, None] * wiggle * torch.tanh(mixed)
        return (gauss + extra).reshape(x.shape).to(x.dtype)


# ---- harness (building and driving the schedulers: inkwash.evaluation.diffusers_bridge) ---------------


def _initial(seed: int = 0) -> torch.Tensor:
    """A standard normal VP state."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noise(seed: int, dtype: torch.dtype = torch.float64) -> Callable[[], torch.Tensor]:
    """inkwash's noise source: the draws diffusers' randn_tensor makes from _generator(seed)."""
    return diffusers_noise(_generator(seed), SHAPE, dtype)


def _diffusers_states(sched, net: Callable, x: torch.Tensor, *, keep=None, **step_kwargs) -> list[torch.Tensor]:
    """diffusers' sampling loop; returns the state before each kept step, then the result.

    ``keep(sched)`` is asked before each step; it drops the inner evaluations of Heun, KDPM2 and
    PNDM so the list lines up with inkwash's steps."""
    states = []

    def record(sched, x: torch.Tensor) -> None:
        if keep is None or keep(sched):
            states.append(x)

    out = run_scheduler(sched, net, x, callback=record, **step_kwargs)
    return [*states, out]


def _inkwash_states(
    sampler: str,
    schedule: NoiseSchedule,
    x_ve: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    vp: bool,
    net: nn.Module | None = None,
    denoised: list | None = None,
    wrap: Callable | None = None,
    **kwargs,
) -> list[torch.Tensor]:
    """inkwash's sampler; the state at the start of each step (from the callback), then the result,
    converted to the VP state ``x / sqrt(1 + sigma^2)`` when ``vp``. Each step's data prediction
    is appended to ``denoised`` when it is given; ``wrap`` wraps the model denoiser (e.g. to clip it)."""
    states = []

    def to_space(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x / math.sqrt(1 + sigma**2) if vp else x

    def callback(info: dict) -> None:
        states.append(to_space(info["x"], info["sigma"]))
        if denoised is not None:
            denoised.append(info["denoised"])

    denoiser = ModelDenoiser(net if net is not None else FakeEps(schedule), schedule)
    if wrap is not None:
        denoiser = wrap(denoiser)
    out = SAMPLERS[sampler].fn(denoiser, x_ve, sigmas.double(), callback=callback, **kwargs)
    return [*states, to_space(out, float(sigmas[-1]))]


def _ve(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    return x_vp * math.sqrt(1 + float(sigma) ** 2)


def _rel_err(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _max_rel_err(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """The largest difference over all states, relative to the state's largest entry."""
    assert len(expected) == len(got), (len(expected), len(got))
    assert all(torch.isfinite(x).all() for x in expected + got)
    return max(_rel_err(e, g) for e, g in zip(expected, got, strict=True))


# ---- the agreement cases --------------------------------------------------------------------------
# Each returns (diffusers' states, inkwash's states) in the same space.


def _ddpm(variance_type: str, variance: str):
    sched = diffusers_scheduler(DDPMScheduler, LINEAR, variance_type=variance_type, clip_sample=False)
    set_timesteps(sched, 20)
    assert torch.equal(sched.timesteps, timesteps_for(LINEAR, 20, "leading"))
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, generator=_generator(1))
    got = _inkwash_states("ddpm", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1), variance=variance)
    return expected, got


def _ddim(eta: float):
    # set_alpha_to_one=True: the last step goes to alpha_bar = 1, i.e. sigma = 0, as inkwash's does.
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=False, set_alpha_to_one=True)
    # "leading" spacing, and 20 divides 1000 (see test_ddim_previous_timestep_assumes_even_spacing).
    set_timesteps(sched, 20)
    assert torch.equal(sched.timesteps, timesteps_for(LINEAR, 20, "leading"))
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, eta=eta, generator=_generator(1))
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1), eta=eta)
    return expected, got


def _ddim_to_sigma_min():
    """Stable Diffusion's DDIM settings: steps_offset=1 and set_alpha_to_one=False, so the last step
    lands on alpha_bar[0] (sigma_min), not on sigma = 0; inkwash gets the same final sigma."""
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    set_timesteps(sched, 20)
    assert sched.timesteps[-1] == 1
    sigmas = torch.cat([LINEAR.sigmas[sched.timesteps], LINEAR.sigmas[:1]])
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, eta=1.0, generator=_generator(1))
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1), eta=1.0)
    return expected, got


CLIP = 0.5  # FakeEps's x0 estimates often leave [-0.5, 0.5], so the clip acts at every step


def _clipped_ddpm():
    """DDPMScheduler(clip_sample=True): the posterior mean from the clipped x0 and x_t, which is
    what any inkwash sampler does with a denoiser that clips its own output."""
    sched = diffusers_scheduler(DDPMScheduler, LINEAR, clip_sample=True, clip_sample_range=CLIP)
    set_timesteps(sched, 20)
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, generator=_generator(1))
    wrap = lambda d: ClampedDenoiser(d, -CLIP, CLIP)  # noqa: E731
    got = _inkwash_states("ddpm", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1), wrap=wrap)
    return expected, got


def _clipped_ddim(eta: float, *, use_clipped_model_output: bool = False):
    """DDIMScheduler(clip_sample=True). By default diffusers keeps the network's noise estimate
    (inkwash's ``clip_range``); with ``use_clipped_model_output`` it re-derives the noise from the
    clipped x0, which is inkwash's DDIM on a clipping denoiser."""
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=True, clip_sample_range=CLIP, set_alpha_to_one=True)
    set_timesteps(sched, 20)
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(
        sched, FakeEps(LINEAR), x, eta=eta, generator=_generator(1), use_clipped_model_output=use_clipped_model_output
    )
    options = {"wrap": lambda d: ClampedDenoiser(d, -CLIP, CLIP)} if use_clipped_model_output else {"clip_range": CLIP}
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1), eta=eta, **options)
    return expected, got


def _plms(sd_settings: bool):
    """PNDMScheduler(skip_prk_steps=True), the latent-diffusion PLMS. With ``sd_settings``
    (steps_offset=1, set_alpha_to_one=False, diffusers' PNDM default) the last step ends at sigma_min."""
    config = {"steps_offset": 1, "set_alpha_to_one": False} if sd_settings else {"set_alpha_to_one": True}
    sched = diffusers_scheduler(PNDMScheduler, LINEAR, skip_prk_steps=True, **config)
    set_timesteps(sched, 20)
    steps = torch.from_numpy(sched._timesteps.astype(np.int64)).flip(0)
    if sd_settings:
        sigmas = torch.cat([LINEAR.sigmas[steps], LINEAR.sigmas[:1]])
    else:
        assert torch.equal(steps, timesteps_for(LINEAR, 20, "leading"))
        sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    # The second call (counter 1) is the inner evaluation of PLMS's first, Heun-like step.
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, keep=lambda s: s.counter != 1)
    got = _inkwash_states("plms", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True)
    return expected, got


def _ve_scheduler_case(cls, sampler: str, *, config: dict, keep=None, noise: bool = False, options=None):
    """A scheduler working on the VE state x0 + sigma*eps, with inkwash given diffusers' sigmas."""
    sched = diffusers_scheduler(cls, SD, **config)
    set_timesteps(sched, 20)
    sigmas = sched.sigmas.unique_consecutive()  # Heun and KDPM2 list each inner sigma twice
    assert sigmas[-1] == 0 and len(sigmas) == 21
    x = _ve(_initial(), sigmas[0])
    kwargs = {"generator": _generator(1)} if noise else {}
    expected = _diffusers_states(sched, FakeEps(SD), x, keep=keep, **kwargs)
    noise_kwargs = {"noise": _noise(1)} if noise else {}
    got = _inkwash_states(sampler, SD, x, sigmas, vp=False, **noise_kwargs, **(options or {}))
    return expected, got


def _first_order_only(sched) -> bool:
    return sched.state_in_first_order


def _euler(karras: bool):
    # Integer timesteps ("leading"), or Karras sigmas whose timesteps diffusers finds with the same
    # log-sigma interpolation as inkwash's sigma_to_t. For the default "linspace" spacing see
    # test_linspace_spacing_gives_the_network_a_linearly_interpolated_timestep.
    config = {"use_karras_sigmas": True} if karras else {"timestep_spacing": "leading"}
    return _ve_scheduler_case(EulerDiscreteScheduler, "euler", config=config)


def _euler_ancestral():
    config = {"timestep_spacing": "trailing"}
    return _ve_scheduler_case(EulerAncestralDiscreteScheduler, "euler_ancestral", config=config, noise=True)


def _heun(karras: bool):
    config = {"use_karras_sigmas": True} if karras else {"timestep_spacing": "trailing"}
    return _ve_scheduler_case(HeunDiscreteScheduler, "heun", config=config, keep=_first_order_only)


def _dpm_2():
    config = {"timestep_spacing": "trailing"}
    return _ve_scheduler_case(KDPM2DiscreteScheduler, "dpm_2", config=config, keep=_first_order_only)


def _lms(karras: bool):
    config = {"use_karras_sigmas": True} if karras else {"timestep_spacing": "leading"}
    return _ve_scheduler_case(LMSDiscreteScheduler, "lms", config=config, options={"order": 4})


def _multistep_vp_case(
    cls, sampler: str, *, config: dict, net_options=None, noise_dtype=None, options=None, denoised=None
):
    """DPM-Solver++ and UniPC work on the VP state; inkwash gets diffusers' sigmas (and appends its data
    predictions to ``denoised`` when given)."""
    sched = diffusers_scheduler(cls, LINEAR, **config)
    set_timesteps(sched, 20)
    sigmas = sched.sigmas
    assert sigmas[-1] == 0 and len(sigmas) == 21
    x = _initial()
    kwargs = {"generator": _generator(1)} if noise_dtype is not None else {}
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, **kwargs)
    noise_kwargs = {"noise": _noise(1, noise_dtype)} if noise_dtype is not None else {}
    net = FakeEps(LINEAR, **(net_options or {}))
    got = _inkwash_states(
        sampler,
        LINEAR,
        _ve(x, sigmas[0]),
        sigmas,
        vp=True,
        net=net,
        denoised=denoised,
        **noise_kwargs,
        **(options or {}),
    )
    return expected, got


DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}


def _dpmpp_2m(karras: bool):
    # With Karras sigmas diffusers rounds the timesteps it gives the network (see
    # test_dpmpp_karras_rounds_the_network_timestep), so inkwash's network rounds too here.
    config = {**DPMPP_2M, "use_karras_sigmas": karras}
    net_options = {"round_t": True} if karras else None
    return _multistep_vp_case(DPMSolverMultistepScheduler, "dpmpp_2m", config=config, net_options=net_options)


def _dpmpp_2m_sde(solver_type: str):
    config = {**DPMPP_2M, "algorithm_type": "sde-dpmsolver++", "solver_type": solver_type}
    # diffusers draws the SDE noise as float32 (DPMSolverMultistepScheduler.step, randn_tensor(dtype=float32)).
    return _multistep_vp_case(
        DPMSolverMultistepScheduler,
        "dpmpp_2m_sde",
        config=config,
        noise_dtype=torch.float32,
        options={"eta": 1.0, "solver_type": solver_type},
    )


def _unipc(order: int, variant: str, denoised: list | None = None):
    config = {"solver_order": order, "solver_type": variant}  # otherwise diffusers' defaults
    options = {"order": order, "variant": variant}
    return _multistep_vp_case(UniPCMultistepScheduler, "unipc", config=config, options=options, denoised=denoised)


# name: (case, tolerance on the largest state difference relative to the state's scale; see the
# module docstring for the three tolerance classes)
CASES = {
    "ddpm fixed_small = beta_tilde": (lambda: _ddpm("fixed_small", "beta_tilde"), 1e-12),
    "ddpm fixed_large = beta": (lambda: _ddpm("fixed_large", "beta"), 1e-12),
    "ddim eta=0": (lambda: _ddim(0.0), 1e-12),
    "ddim eta=1": (lambda: _ddim(1.0), 1e-12),
    "ddim eta=1 to sigma_min": (_ddim_to_sigma_min, 1e-12),
    "ddpm clip_sample": (_clipped_ddpm, 1e-12),
    "ddim eta=0 clip_sample": (lambda: _clipped_ddim(0.0), 1e-12),
    "ddim eta=1 clip_sample": (lambda: _clipped_ddim(1.0), 1e-12),
    "ddim eta=0 clip_sample, use_clipped_model_output": (
        lambda: _clipped_ddim(0.0, use_clipped_model_output=True),
        1e-12,
    ),
    "plms (pndm skip_prk_steps)": (lambda: _plms(False), 1e-12),
    "plms to sigma_min": (lambda: _plms(True), 1e-12),
    "euler leading": (lambda: _euler(False), 2e-6),
    "euler karras": (lambda: _euler(True), 2e-6),
    "euler_ancestral trailing": (_euler_ancestral, 2e-6),
    "heun trailing": (lambda: _heun(False), 5e-7),
    "heun karras": (lambda: _heun(True), 5e-7),
    "dpm_2 trailing": (_dpm_2, 5e-7),
    "lms leading": (lambda: _lms(False), 5e-7),
    "lms karras": (lambda: _lms(True), 5e-7),
    "dpmpp_2m": (lambda: _dpmpp_2m(False), 2e-6),
    "dpmpp_2m karras (rounded t)": (lambda: _dpmpp_2m(True), 2e-6),
    "dpmpp_2m_sde midpoint": (lambda: _dpmpp_2m_sde("midpoint"), 2e-6),
    "dpmpp_2m_sde heun": (lambda: _dpmpp_2m_sde("heun"), 2e-6),
    "unipc bh2 order 2": (lambda: _unipc(2, "bh2"), 5e-7),
    "unipc bh2 order 3": (lambda: _unipc(3, "bh2"), 5e-7),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_diffusers_step_by_step(name):
    case, tolerance = CASES[name]
    expected, got = case()
    assert _max_rel_err(expected, got) < tolerance


def test_harness_detects_a_network_timestep_off_by_one():
    """The comparison can fail: inkwash's network told t + 1 instead of t is far outside tolerance."""
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=False)
    set_timesteps(sched, 20)
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x)
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, net=FakeEps(LINEAR, t_shift=1.0))
    assert _max_rel_err(expected, got) > 1e-4


def test_the_two_clipping_conventions_of_ddim_differ():
    """The clip matters here, and the two ways of using the clipped x0 give different states: diffusers'
    default (keep the network's noise) is far from inkwash's DDIM on a clipping denoiser."""
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=True, clip_sample_range=CLIP, set_alpha_to_one=True)
    set_timesteps(sched, 20)
    sigmas = build_sigmas(LINEAR, 20, "leading")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x)
    x_ve = _ve(x, sigmas[0])
    rederived = _inkwash_states("ddim", LINEAR, x_ve, sigmas, vp=True, wrap=lambda d: ClampedDenoiser(d, -CLIP, CLIP))
    unclipped = _inkwash_states("ddim", LINEAR, x_ve, sigmas, vp=True)
    assert _max_rel_err(expected, rederived) > 1e-3
    assert _max_rel_err(expected, unclipped) > 1e-3


# ---- schedules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [LINEAR, SD, COSINE], ids=["linear", "scaled_linear", "cosine"])
def test_schedule_tables_match_diffusers(schedule):
    """diffusers' float32 tables (cosine = "squaredcos_cap_v2") equal inkwash's float64 ones to float32 precision."""
    sched = diffusers_scheduler(DDPMScheduler, schedule, float64=False)
    assert sched.betas.dtype == torch.float32
    torch.testing.assert_close(sched.betas.double(), schedule.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.alphas_cumprod.double(), schedule.alpha_bar, rtol=1e-4, atol=0)


@pytest.mark.parametrize("steps", [1, 7, 20, 30, 333, 999, 1000])
@pytest.mark.parametrize(
    ("spacing", "diffusers_spacing"), [("uniform", "linspace"), ("leading", "leading"), ("trailing", "trailing")]
)
def test_timesteps_match_diffusers(spacing, diffusers_spacing, steps):
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, timestep_spacing=diffusers_spacing)
    sched.set_timesteps(steps)
    assert torch.equal(timesteps_for(LINEAR, steps, spacing), sched.timesteps)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_karras_and_exponential_sigmas_match_diffusers(cls, kind):
    """Same sigma range and formula; diffusers rounds the result to float32."""
    sched = diffusers_scheduler(getattr(diffusers, cls), SD, **{f"use_{kind}_sigmas": True})
    sched.set_timesteps(25)
    torch.testing.assert_close(sched.sigmas.double(), build_sigmas(SD, 25, kind), rtol=1e-6, atol=0)


def test_sigma_to_t_matches_diffusers():
    """diffusers' _sigma_to_t (used for Karras and exponential sigmas) interpolates log-sigma like inkwash."""
    sched = diffusers_scheduler(EulerDiscreteScheduler, SD)
    sigmas = torch.exp(torch.linspace(math.log(SD.sigma_min) - 1, math.log(SD.sigma_max) + 1, 301, dtype=torch.float64))
    ours = SD.sigma_to_t(sigmas)
    theirs = sched._sigma_to_t(sigmas.numpy(), SD.log_sigmas.numpy())
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=0, atol=1e-9)
    assert ours.min() == 0 and ours.max() == 999 and 0 < ours[150] < 999


# ---- where diffusers departs from the published algorithms ----------------------------------------


def test_ddim_steps_to_the_next_timestep_of_an_uneven_grid():
    """Song et al. 2021 step from tau_i to tau_{i-1} of the chosen subsequence (DDIM Eq. 12 with eta = 0).
    30 "uniform" (diffusers' "linspace") steps do not divide T = 1000: 999, 965, 930, ... inkwash's DDIM
    reads each next sigma from the grid, so every step lands on the grid's next timestep (the last on
    alpha_bar = 1)."""
    steps = timesteps_for(LINEAR, 30, "uniform")
    assert steps[:3].tolist() == [999, 965, 930]
    sigmas = build_sigmas(LINEAR, 30, "uniform")
    assert torch.equal(sigmas, torch.cat([LINEAR.sigmas[steps], LINEAR.sigmas.new_zeros(1)]))
    net, x = FakeEps(LINEAR), _initial()
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True)
    alpha_bar = torch.cat([LINEAR.alpha_bar[steps], LINEAR.alpha_bar.new_ones(1)])
    for i, t in enumerate(steps.tolist()):
        eps = net(got[i], t)
        x0 = (got[i] - (1 - alpha_bar[i]).sqrt() * eps) / alpha_bar[i].sqrt()
        expected = alpha_bar[i + 1].sqrt() * x0 + (1 - alpha_bar[i + 1]).sqrt() * eps
        assert _rel_err(expected, got[i + 1]) < 1e-12, i


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: DDIMScheduler.step's prev_timestep = timestep - T // num_inference_steps "
    "assumes evenly spaced timesteps",
)
def test_diffusers_ddim_steps_to_the_next_timestep_of_an_uneven_grid():
    """diffusers' DDIM on 30 "linspace" steps should agree with inkwash's on the same timesteps (the DDIM
    tolerance, 1e-12). DDIMScheduler.step: ``prev_timestep = timestep - self.config.num_train_timesteps //
    self.num_inference_steps``, so with a step count that does not divide T it leaves the grid: from
    t = 999 the first step lands on 966, not 965, and the states drift apart (by 5e-3 and more,
    diffusers 0.42.1). PNDMScheduler.step_plms derives prev_timestep the same way."""
    sched = diffusers_scheduler(DDIMScheduler, LINEAR, clip_sample=False, timestep_spacing="linspace")
    set_timesteps(sched, 30)
    net, x = FakeEps(LINEAR), _initial()
    expected = _diffusers_states(sched, net, x)
    sigmas = torch.cat([LINEAR.sigmas[sched.timesteps], LINEAR.sigmas.new_zeros(1)])
    got = _inkwash_states("ddim", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True)
    assert _max_rel_err(expected, got) < 1e-12


def _ddpm_trailing(denoised: list | None = None):
    """DDPM, "fixed_large" variance (inkwash's ``beta``), 10 "trailing" steps: the last timestep is 99."""
    sched = diffusers_scheduler(
        DDPMScheduler, LINEAR, variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing"
    )
    set_timesteps(sched, 10)
    assert sched.timesteps[-1] == 99
    sigmas = build_sigmas(LINEAR, 10, "trailing")
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, generator=_generator(1))
    noise = _noise(1)
    got = _inkwash_states(
        "ddpm", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=noise, variance="beta", denoised=denoised
    )
    return expected, got, noise


def test_ddpm_adds_no_noise_on_the_final_step_when_the_last_timestep_is_not_0():
    """Ho et al. 2020, Algorithm 2, line 3: z = 0 on the last step (improved-diffusion's respaced chain:
    ``nonzero_mask = (t != 0)`` on the respaced index). With "trailing" spacing the last timestep is 99,
    and inkwash's last step, to alpha_bar = 1, returns its x0 estimate with no noise: it draws 9 noises
    for 10 steps. Every earlier state agrees with diffusers'."""
    denoised = []
    expected, got, noise = _ddpm_trailing(denoised)
    assert _max_rel_err(expected[:-1], got[:-1]) < 1e-12
    assert _rel_err(denoised[-1], got[-1]) < 1e-12
    draws = _noise(1)
    assert torch.equal(noise(), [draws() for _ in range(10)][-1])  # the next draw is the 10th


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: DDPMScheduler.step adds noise on the final step when its timestep is not 0 "
    "(it tests `if t > 0`, not the last step)",
)
def test_diffusers_ddpm_adds_no_noise_on_the_final_step_when_the_last_timestep_is_not_0():
    """diffusers' DDPM should agree with inkwash's to the last state (the DDPM tolerance, 1e-12).
    DDPMScheduler.step tests the original timestep, ``if t > 0:``, so with "trailing" spacing (last
    timestep 99; likewise "leading" with steps_offset=1) its last step adds a 10th noise, with
    variance_type="fixed_large" of variance ``current_beta_t = 1 - alpha_prod_t / 1``, std 0.3 here
    (diffusers 0.42.1). ("fixed_small" gives 0 there, clamped to 1e-20.)"""
    expected, got, _ = _ddpm_trailing()
    assert _max_rel_err(expected, got) < 1e-12


def _euler_churn():
    """Euler with churn on the first of 10 "leading" steps (gamma = 1/10): diffusers' states, inkwash's,
    the sigmas and the churned point (sigma_hat, x_hat)."""
    sched = diffusers_scheduler(EulerDiscreteScheduler, SD, timestep_spacing="leading")
    set_timesteps(sched, 10)
    sigma, sigma_next = sched.sigmas[0].item(), sched.sigmas[1].item()
    churn = {"s_churn": 1.0, "s_tmin": (sigma + sigma_next) / 2}  # gamma = 1/10, on the first step only
    x = _ve(_initial(), sigma)
    expected = _diffusers_states(sched, FakeEps(SD), x, generator=_generator(1), **churn)
    got = _inkwash_states("euler", SD, x, sched.sigmas, vp=False, noise=_noise(1), **churn)
    sigma_hat = 1.1 * sigma
    x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * _noise(1)()
    return sched, expected, got, (sigma, sigma_next, sigma_hat, x, x_hat)


def test_euler_churn_evaluates_the_denoiser_after_the_churn_noise():
    """Karras et al. 2022, Algorithm 2: raise sigma to sigma_hat (x_hat = x + sqrt(sigma_hat^2 -
    sigma^2) z), then evaluate D(x_hat, sigma_hat) and take the Euler step from x_hat with its slope."""
    _, _, got, (_, sigma_next, sigma_hat, _, x_hat) = _euler_churn()
    denoised_hat = ModelDenoiser(FakeEps(SD), SD)(x_hat, sigma_hat)
    assert _rel_err(x_hat + (x_hat - denoised_hat) / sigma_hat * (sigma_next - sigma_hat), got[1]) < 1e-9


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: EulerDiscreteScheduler.step adds the churn noise after the network has been "
    "evaluated at (x, t), so its slope is not the one at x_hat (Karras et al. 2022, Algorithm 2)",
)
def test_diffusers_euler_churn_evaluates_the_network_after_the_churn_noise():
    """diffusers' Euler with churn should agree with inkwash's (the Euler tolerance, 2e-6). Its pipeline
    evaluates the network at (x, t) first; EulerDiscreteScheduler.step then adds the churn noise
    (``sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5``) and reuses that output:
    ``pred_original_sample = sample - sigma_hat * model_output``. So its Euler slope is eps(x, t), not
    the one at x_hat, and its states differ from the first step on (diffusers 0.42.1)."""
    _, expected, got, _ = _euler_churn()
    assert _max_rel_err(expected, got) < 2e-6


class LinearInterpolatedT(nn.Module):
    """FakeEps told diffusers' "linspace" timestep: t(sigma) by linear interpolation in sigma."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.net, self.schedule = FakeEps(schedule), schedule

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(torch.as_tensor(t, dtype=torch.float64))
        table = self.schedule.sigmas.numpy()
        return self.net(x, torch.from_numpy(np.interp(sigma.numpy(), table, np.arange(len(table), dtype=float))))


def test_linspace_spacing_gives_the_network_a_linearly_interpolated_timestep():
    """Not an error, a different convention: EulerDiscreteScheduler's default "linspace" spacing
    (as in Euler a, Heun, LMS and KDPM2) uses fractional timesteps ``np.linspace(0, T - 1, n)`` and
    ``sigmas = np.interp(timesteps, np.arange(T), sigmas)``, linear in sigma, while inkwash's
    t(sigma), like k-diffusion's, interpolates log-sigma. So the network is told a timestep up to
    1.3e-3 away, which moves the samples by ~2e-6 (relative) here; told diffusers' timestep,
    inkwash's Euler agrees as closely as in the other Euler cases."""
    sched = diffusers_scheduler(EulerDiscreteScheduler, SD)
    set_timesteps(sched, 20)
    t_diffusers = sched.timesteps.double()
    assert (t_diffusers != t_diffusers.round()).any()
    gap = (SD.sigma_to_t(sched.sigmas[:-1]) - t_diffusers).abs().max().item()
    assert 5e-4 < gap < 1e-2
    x = _ve(_initial(), sched.sigmas[0])
    expected = _diffusers_states(sched, FakeEps(SD), x)
    linear_t = _inkwash_states("euler", SD, x, sched.sigmas, vp=False, net=LinearInterpolatedT(SD))
    assert _max_rel_err(expected, linear_t) < 1e-6
    log_t = _inkwash_states("euler", SD, x, sched.sigmas, vp=False)
    assert _max_rel_err(expected, log_t) < 1e-5


def test_dpmpp_karras_rounds_the_network_timestep():
    """DPMSolverMultistepScheduler.set_timesteps with use_karras_sigmas: ``timesteps =
    timesteps.round()`` (for every beta schedule but squaredcos_cap_v2), while step() uses the
    unrounded Karras sigmas: the network is conditioned on round(t(sigma)), not t(sigma). The
    agreement case "dpmpp_2m karras (rounded t)" matches once inkwash's network rounds too."""
    sched = diffusers_scheduler(DPMSolverMultistepScheduler, LINEAR, **DPMPP_2M, use_karras_sigmas=True)
    set_timesteps(sched, 20)
    t_exact = LINEAR.sigma_to_t(sched.sigmas[:-1])
    assert torch.equal(sched.timesteps.double(), t_exact.round())
    assert (t_exact - sched.timesteps).abs().max() > 0.1
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x)
    got = _inkwash_states("dpmpp_2m", LINEAR, _ve(x, sched.sigmas[0]), sched.sigmas, vp=True)
    assert _max_rel_err(expected, got) > 1e-4


GAUSSIAN_VARIANCE = 0.5  # a cheap exact model of N(0, 0.5 I) data keeps the 1000-step runs fast


def _gaussian_eps(x_vp: torch.Tensor, t) -> torch.Tensor:
    """The exact noise prediction for N(0, GAUSSIAN_VARIANCE I) data at integer timestep t."""
    alpha_bar = LINEAR.alpha_bar[int(t)].item()
    return x_vp * math.sqrt(1 - alpha_bar) / (GAUSSIAN_VARIANCE * alpha_bar + 1 - alpha_bar)


def test_dpmpp_2m_at_1000_steps():
    """inkwash's DPM-Solver++(2M) on the uniform 1000-step schedule (t = 999 .. 0, all distinct, so no
    step has h = 0) stays finite and lands near the data's scale."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        return x * GAUSSIAN_VARIANCE / (GAUSSIAN_VARIANCE + sigma.reshape(-1, 1, 1, 1) ** 2)

    sigmas = build_sigmas(LINEAR, 1000, "uniform")
    assert len(sigmas.unique()) == 1001
    out = SAMPLERS["dpmpp_2m"].fn(denoiser, _ve(_initial(), sigmas[0]), sigmas)
    assert torch.isfinite(out).all() and 0.3 < out.std() < 1.0


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: DPMSolverMultistepScheduler at 1000 linspace steps repeats timestep 500, "
    "so r0 = 0 and D1 = inf * 0 = NaN",
)
def test_diffusers_dpmpp_2m_at_1000_steps_stays_finite():
    """Stock diffusers (float32 tables) DPM-Solver++(2M) at 1000 steps, default "linspace" spacing,
    should stay finite like inkwash's. ``np.linspace(0, last_timestep - 1, num_inference_steps +
    1).round()[::-1][:-1]`` puts 1001 points on [0, 999], so timestep 500 appears twice. Step 499 goes
    from t = 500 to t = 500 (h = 0); step 500 then has r0 = h_0 / h = 0 and the same model output twice,
    so ``D1 = (1.0 / r0) * (m0 - m1)`` = inf * 0 = NaN (multistep_dpm_solver_second_order_update), and
    every later state is NaN (diffusers 0.42.1)."""
    sched = diffusers_scheduler(DPMSolverMultistepScheduler, LINEAR, float64=False, **DPMPP_2M)
    set_timesteps(sched, 1000, float64=False)
    assert len(sched.timesteps) == 1000
    states = _diffusers_states(sched, _gaussian_eps, _initial().float())
    assert all(torch.isfinite(state).all() for state in states)
    assert 0.3 < states[-1].std() < 1.0


def test_unipc_bh1_final_step_to_zero_returns_the_data_prediction():
    """unipc(variant="bh1") on diffusers' grid, whose last step goes to sigma = 0: every earlier state
    agrees with diffusers' UniPCMultistepScheduler(solver_type="bh1"), and the last step returns the
    limit of the update as sigma_next -> 0, the data prediction, finite."""
    denoised = []
    expected, got = _unipc(2, "bh1", denoised)
    assert _max_rel_err(expected[:-1], got[:-1]) < 1e-12
    assert torch.isfinite(got[-1]).all()
    assert _rel_err(denoised[-1], got[-1]) < 1e-12


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: UniPCMultistepScheduler(solver_type='bh1') computes -inf * 0 = NaN on a "
    "final step to sigma = 0",
)
def test_diffusers_unipc_bh1_final_step_to_zero_is_finite():
    """diffusers' UniPC bh1 should agree with inkwash's to the last state (the UniPC tolerance, 5e-7).
    With the default final_sigmas_type="zero", on the last step sigma_next = 0, so h = inf and ``B_h =
    hh = -inf``; with order 1 there ``pred_res = 0`` and ``x_t = x_t_ - alpha_t * B_h * pred_res`` is
    -inf * 0 = NaN (multistep_uni_p_bh_update; diffusers 0.42.1)."""
    expected, got = _unipc(2, "bh1")
    assert _max_rel_err(expected, got) < 5e-7


def _dpmpp_3m_sde(denoised: list | None = None):
    """DPM-Solver++(3M) SDE on diffusers' 20-step grid; solver_type="heun" as inkwash's second-order warm-up."""
    config = {**DPMPP_2M, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}
    sched = diffusers_scheduler(DPMSolverMultistepScheduler, LINEAR, **config)
    set_timesteps(sched, 20)
    sigmas = sched.sigmas
    x = _initial()
    expected = _diffusers_states(sched, FakeEps(LINEAR), x, generator=_generator(1))
    got = _inkwash_states(
        "dpmpp_3m_sde", LINEAR, _ve(x, sigmas[0]), sigmas, vp=True, noise=_noise(1, torch.float32), denoised=denoised
    )
    return sigmas, expected, got


def test_dpmpp_3m_sde_third_order_step_follows_k_diffusion():
    """The first two steps (first and second order) agree with diffusers'. The first third-order step
    is k-diffusion's sample_dpmpp_3m_sde (eta = 1, h_eta = 2 h): ``x = e^{-h_eta} x + (1 - e^{-h_eta})
    D0 + phi_2 D1 - phi_3 D2 + sigma_next sqrt(1 - e^{-2 h}) z``, with ``phi_2 = (e^{-h_eta} - 1) / h_eta
    + 1`` and ``phi_3 = phi_2 / h_eta - 0.5``, whose D2 term vanishes as h -> 0 as the ODE's does."""
    denoised = []
    sigmas, expected, got = _dpmpp_3m_sde(denoised)
    assert _max_rel_err(expected[:3], got[:3]) < 1e-6
    lam = -sigmas[:4].log()
    h, h_1, h_2 = (lam[3] - lam[2]).item(), (lam[2] - lam[1]).item(), (lam[1] - lam[0]).item()
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (denoised[2] - denoised[1]) / r0, (denoised[1] - denoised[0]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    h_eta = 2 * h
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    draws = _noise(1, torch.float32)
    z = [draws() for _ in range(3)][-1]  # the third step's noise
    sigma_next = sigmas[3].item()
    x_ve = _ve(got[2], sigmas[2])
    x_next = math.exp(-h_eta) * x_ve - math.expm1(-h_eta) * denoised[2] + phi_2 * d1 - phi_3 * d2
    x_next = x_next + sigma_next * math.sqrt(-math.expm1(-2 * h)) * z
    assert _rel_err(x_next / math.sqrt(1 + sigma_next**2), got[3]) < 1e-12


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="diffusers bug: DPMSolverMultistepScheduler's sde-dpmsolver++ third-order update has the "
    "wrong sign on 0.5 in its D2 coefficient",
)
def test_diffusers_dpmpp_3m_sde_agrees_with_k_diffusion():
    """diffusers' DPM-Solver++(3M) SDE should agree with inkwash's to the last state (the DPM-Solver++
    tolerance, 2e-6). multistep_dpm_solver_third_order_update, "sde-dpmsolver++": ``+ (alpha_t * ((1.0
    - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2``. Its own ODE branch (and
    k-diffusion's sample_dpmpp_3m_sde) has ``-(phi_2 / h_eta - 0.5)``, i.e. ``... + 0.5``: the SDE
    coefficient is 1 too small, so it does not vanish as h -> 0, and after the first third-order step
    the states differ by exactly alpha_t * D2 (diffusers 0.42.1)."""
    _, expected, got = _dpmpp_3m_sde()
    assert _max_rel_err(expected, got) < 2e-6
