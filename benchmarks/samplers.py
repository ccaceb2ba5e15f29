"""inkwash's samplers against diffusers' schedulers at equal NFE, on the exact denoiser of a Gaussian mixture.

Both libraries sample an oracle Gaussian mixture (``--gmm``, ``inkwash.evaluation.oracle``), whose exact denoiser
``D(x, sigma) = E[x0 | x0 + sigma * eps = x]`` stands in for a perfectly trained network, so every
difference in the samples comes from the sampler and its step schedule. The default, the 64-dimensional
``gmm64``, is the mixture on which inkwash's default step schedules were chosen (seed 0), so a table on
it alone flatters inkwash; ``--gmm gmm48`` (16 modes in 48 dimensions) played no part in that choice
and is the held-out check. For diffusers the oracle is
an epsilon "network" on the variance-preserving state: given ``x_vp`` at timestep t it takes
``sigma = t_to_sigma(t)`` (inkwash's log-sigma interpolation for fractional t), ``x = x_vp *
sqrt(1 + sigma^2)`` and returns ``(x - D(x, sigma)) / sigma``. The VE-state schedulers (Euler, Heun,
LMS, ...) hand it ``scale_model_input(x)``, which is that same VP state, exactly as a pipeline does.

Each sampler runs at (at most) the target NFE on each side, the step count chosen per library so
that its own evaluation count is the largest that does not exceed the target; the NFE actually used
is reported for each. Both sides start from the same standard normal draw (scaled by each library's
initial sigma) and draw their later noise from the same seeded generator, in the dtype diffusers
uses. Settings: diffusers with its defaults for a linear beta schedule (T = 1000, betas 1e-4 .. 0.02,
``clip_sample=False`` where the scheduler clips, its default ``timestep_spacing``), with inkwash's
float64 tables in place of its float32 ones (same values; the harness, ``inkwash.evaluation.diffusers_bridge``,
is shared with tests/test_diffusers_agreement.py);
``--diffusers-karras`` gives it ``use_karras_sigmas=True`` where supported. inkwash runs each sampler
with its default step schedule and options, as ``inkwash sample`` does (``--schedule NAME`` forces one).

Scores: the sliced Wasserstein distance (SWD) of the samples to a fixed set of exact samples (the
same projections for every run), the floor (the SWD between two exact sets of the same size: what a
perfect sampler scores) and the mode-weight error (total variation of the mode histogram). The
ratio inkwash / diffusers <= 1 means inkwash is at least as accurate. Near the floor the SWD cannot
tell two good samplers apart (its own sampling noise is larger than their difference), so each
deterministic sampler is also scored by its path error: the RMS distance of its first 2,000 samples
to the exact probability-flow ODE solution from the same initial noise and the same first sigma
(``GaussianMixture.ode_solution``, fourth-order Runge-Kutta; the run prints that reference's own
error). That is the solver's error itself, with no sampling noise in it. At the target NFE nearest 10 it
also reports the best sampler of each library with the table's schedules and, unless
``--no-best-search``, over every schedule each library offers (inkwash's five step schedules;
diffusers' timestep spacings and Karras sigmas where the scheduler has them).

Also prints each sampler's own cost per step without the model: a trivial denoiser (``x * 0.5``) on a
(64, 3, 32, 32) float32 batch for 50 steps, minus the time of just calling it as often, for inkwash's
sampler and for diffusers' ``scale_model_input`` + ``step`` loop (stock float32 tables).

    python benchmarks/samplers.py [--gmm gmm64] [--nfe 5,10,20,50] [--samplers all] [--num-samples 10000]
        [--seed 0] [--schedule auto] [--diffusers-karras] [--no-best-search] [--no-overhead] [--threads 1]
        [--json out.json]
    python benchmarks/samplers.py --gmm gmm48 --seed 1     # the held-out mixture, another seed

Runs single-threaded by default: on a busy machine torch's intra-op threads stall (40x slower here).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import STEP_SCHEDULES, build_sigmas
from inkwash.evaluation.diffusers_bridge import diffusers_noise, diffusers_scheduler, run_scheduler, set_timesteps
from inkwash.evaluation.distances import sliced_wasserstein
from inkwash.evaluation.oracle import GaussianMixture, load_gmm
from inkwash.sampling.generate import CountingDenoiser
from inkwash.sampling.samplers import SAMPLERS, get_sampler

LINEAR = NoiseSchedule(ScheduleConfig("linear", 1000, 1e-4, 0.02))
PATH_ROWS = 2000  # initial noises whose exact ODE solution is computed for the path error
PATH_FLOW_STEPS = 200  # Runge-Kutta steps of that solution; main() prints its own error against twice as many
OVERHEAD_SHAPE = (64, 3, 32, 32)


@dataclass(frozen=True)
class Twin:
    """The diffusers scheduler that runs the same algorithm as an inkwash sampler."""

    scheduler: str
    config: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)
    noise_dtype: torch.dtype = torch.float64  # the dtype its step draws noise in
    requires: str | None = None  # an optional module it needs


SDE_NOISE = torch.float32  # DPMSolverMultistepScheduler.step draws its SDE noise as float32
TWINS: dict[str, Twin] = {
    "ddpm": Twin("DDPMScheduler", {"clip_sample": False}),
    "ddim": Twin("DDIMScheduler", {"clip_sample": False}, {"eta": 0.0}),
    "euler": Twin("EulerDiscreteScheduler"),
    "euler_ancestral": Twin("EulerAncestralDiscreteScheduler"),
    "heun": Twin("HeunDiscreteScheduler"),
    "dpm_2": Twin("KDPM2DiscreteScheduler"),
    "dpm_2_ancestral": Twin("KDPM2AncestralDiscreteScheduler"),
    "lms": Twin("LMSDiscreteScheduler"),
    "plms": Twin("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmpp_2m": Twin("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": Twin("DPMSolverSDEScheduler", requires="torchsde"),
    "dpmpp_2m_sde": Twin(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, noise_dtype=SDE_NOISE
    ),
    "dpmpp_3m_sde": Twin(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, noise_dtype=SDE_NOISE
    ),
    "unipc": Twin("UniPCMultistepScheduler"),
}
NO_TWIN = {
    "dpmpp_2s_ancestral": "diffusers has no DPM++ 2S a: DPMSolverSinglestepScheduler is singlestep DPM-Solver++ "
    "(deterministic, or its SDE form), not the ancestral 2S step with the sigma_down / sigma_up split",
}


@dataclass
class Row:
    sampler: str
    target_nfe: int
    inkwash_steps: int
    inkwash_nfe: int
    inkwash_swd: float
    inkwash_mode_error: float
    diffusers_steps: int | None
    diffusers_nfe: int | None
    diffusers_swd: float | None
    diffusers_mode_error: float | None
    floor: float
    note: str = ""
    inkwash_path: float | None = None  # deterministic samplers: RMS distance to the exact ODE solution
    diffusers_path: float | None = None
    inkwash_start: float | None = None  # the sigma each side's initial noise stands at
    diffusers_start: float | None = None

    @property
    def ratio(self) -> float:
        if self.diffusers_swd is None or not self.diffusers_swd > 0:
            return float("nan")
        return self.inkwash_swd / self.diffusers_swd

    @property
    def path_ratio(self) -> float:
        """Path errors compare only from the same start: a lower first sigma is a shorter ODE to solve
        (and a worse prior, which the SWD sees instead)."""
        if self.inkwash_path is None or self.diffusers_path is None or not self.diffusers_path > 0:
            return float("nan")
        if not math.isclose(self.inkwash_start, self.diffusers_start, rel_tol=1e-6):
            return float("nan")
        return self.inkwash_path / self.diffusers_path


# ---- diffusers ------------------------------------------------------------------------------------


def _diffusers():
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # numpy on torch tensors, thousands of times
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers

    return diffusers


def twin_unavailable(twin: Twin) -> str | None:
    """Why diffusers cannot run this twin here, or None."""
    if twin.requires is not None and importlib.util.find_spec(twin.requires) is None:
        return f"diffusers' {twin.scheduler} needs {twin.requires}, which is not importable"
    return None


SPACINGS = ("linspace", "leading", "trailing")


def _init_parameters(twin: Twin):
    return inspect.signature(getattr(_diffusers(), twin.scheduler).__init__).parameters


def default_schedule(twin: Twin) -> str:
    """The twin's default schedule: its default ``timestep_spacing``."""
    spacing = _init_parameters(twin).get("timestep_spacing")
    return spacing.default if spacing is not None else "default"


def diffusers_schedules(twin: Twin) -> list[str]:
    """Every schedule the twin offers: its timestep spacings, then "karras" where supported."""
    parameters = _init_parameters(twin)
    names = [default_schedule(twin)]
    if "timestep_spacing" in parameters:
        names += [spacing for spacing in SPACINGS if spacing not in names]
    if "use_karras_sigmas" in parameters:
        names.append("karras")
    return names


def table_schedule(twin: Twin, karras: bool) -> str:
    """The schedule the comparison table gives diffusers: karras with ``--diffusers-karras`` where supported."""
    return "karras" if karras and "karras" in diffusers_schedules(twin) else default_schedule(twin)


def make_scheduler(twin: Twin, steps: int, schedule: str, *, float64: bool = True, seed: int = 0):
    """The twin scheduler on the linear DDPM schedule with the named schedule (see ``diffusers_schedules``),
    its timesteps set for ``steps`` steps.

    With ``float64`` its beta / alpha tables are inkwash's float64 ones and its sigma table is upcast
    after ``set_timesteps`` (the same float32 values, float64 arithmetic)."""
    cls = getattr(_diffusers(), twin.scheduler)
    config = dict(twin.config)
    if schedule == "karras":
        config["use_karras_sigmas"] = True
    elif schedule in SPACINGS:
        config["timestep_spacing"] = schedule
    if "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        config["noise_sampler_seed"] = seed
    sched = diffusers_scheduler(cls, LINEAR, float64=float64, **config)
    set_timesteps(sched, steps, float64=float64)
    return sched


def diffusers_nfe(twin: Twin, steps: int, schedule: str) -> int:
    """One model call per entry of ``timesteps`` (Heun and KDPM2 list each inner point too)."""
    return len(make_scheduler(twin, steps, schedule).timesteps)


class OracleEps:
    """The exact oracle as an epsilon network on the VP state ``x_vp`` at (possibly fractional) timestep t."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.gmm, self.schedule, self.calls = gmm, schedule, 0

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        sigma = float(self.schedule.t_to_sigma(torch.as_tensor(t, dtype=torch.float64)))
        x = x_vp * math.sqrt(1.0 + sigma**2)
        return (x - self.gmm(x, sigma)) / sigma


def step_kwargs_for(sched, twin: Twin, generator: torch.Generator | None) -> dict:
    kwargs = dict(twin.step_kwargs)
    if generator is not None and "generator" in inspect.signature(sched.step).parameters:
        kwargs["generator"] = generator
    return kwargs


def run_diffusers(
    gmm: GaussianMixture, twin: Twin, steps: int, schedule: str, num_samples: int, seed: int
) -> tuple[torch.Tensor, int, float]:
    """A pipeline's sampling loop with the oracle as its network; samples (N, D), the NFE and the sigma
    of its first model call (where its initial noise stands)."""
    sched = make_scheduler(twin, steps, schedule, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, gmm.dim, generator=generator, dtype=torch.float64) * sched.init_noise_sigma
    model = OracleEps(gmm, LINEAR)
    x = run_scheduler(sched, model, x, **step_kwargs_for(sched, twin, generator))
    start = float(LINEAR.t_to_sigma(torch.as_tensor(sched.timesteps[0], dtype=torch.float64)))
    return x.double(), model.calls, start


# ---- inkwash --------------------------------------------------------------------------------------


def _half(x: torch.Tensor, sigma=None, cond=None) -> torch.Tensor:
    return x * 0.5


def inkwash_nfe(sampler: str, steps: int, schedule: str) -> int:
    counter = CountingDenoiser(_half)
    get_sampler(sampler).fn(counter, torch.ones(1, 4, dtype=torch.float64), build_sigmas(LINEAR, steps, schedule))
    return counter.calls


def run_inkwash(
    gmm: GaussianMixture,
    sampler: str,
    sigmas: torch.Tensor,
    num_samples: int,
    seed: int,
    noise_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, int]:
    """As ``inkwash.evaluation.sampler_bench.run_sampler``, with the noise drawn in ``noise_dtype``
    (diffusers' dtype)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, gmm.dim, generator=generator, dtype=torch.float64)
    x = x * math.sqrt(1.0 + sigmas[0].item() ** 2)
    counter = CountingDenoiser(gmm)
    noise = diffusers_noise(generator, (num_samples, gmm.dim), noise_dtype)
    return get_sampler(sampler).fn(counter, x, sigmas, noise=noise), counter.calls


# ---- the comparison -------------------------------------------------------------------------------


def largest_steps(nfe_of, target: int) -> int | None:
    """The largest step count whose NFE does not exceed ``target`` (NFE >= steps for every sampler)."""
    for steps in range(target, 0, -1):
        try:
            if nfe_of(steps) <= target:
                return steps
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError):
            continue
    return None


@dataclass
class Result:
    """One sampling run: the step count, the NFE it used and its scores."""

    steps: int
    nfe: int
    swd: float
    mode_error: float
    path_error: float | None = None  # deterministic runs: RMS distance to the exact ODE solution (Bench.path_error)
    start_sigma: float | None = None


class Bench:
    """Runs and scores samplers on the oracle against one fixed set of exact samples; remembers every run."""

    def __init__(self, gmm: GaussianMixture, num_samples: int, seed: int, path_rows: int = PATH_ROWS) -> None:
        self.gmm, self.num_samples, self.seed = gmm, num_samples, seed
        # Both libraries' first draw: the initial noise, before each scales it by its first sigma.
        self.start = torch.randn(
            num_samples, gmm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        self.path_rows = min(path_rows, num_samples)
        self.flows: dict[tuple[float, int], torch.Tensor] = {}
        self.reference, _ = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 1))
        other, _ = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 2))
        self.floor = self.swd(other)
        self.floor_mode_error = gmm.mode_weight_error(other)
        self.runs: dict[tuple[str, str, str, int], Result | None] = {}

    def swd(self, samples: torch.Tensor) -> float:
        """SWD to the reference, with the same projections (the same generator seed) for every run."""
        return sliced_wasserstein(samples, self.reference, generator=torch.Generator().manual_seed(self.seed + 3))

    def exact_flow(self, sigma_start: float, steps: int = PATH_FLOW_STEPS) -> torch.Tensor:
        """The exact probability-flow ODE solution from the first ``path_rows`` initial noises placed at
        ``sigma_start`` (``GaussianMixture.ode_solution``): what a perfect deterministic sampler returns."""
        key = (round(sigma_start, 9), steps)
        if key not in self.flows:
            x = self.start[: self.path_rows] * math.sqrt(1.0 + sigma_start**2)
            self.flows[key] = self.gmm.ode_solution(x, sigma_start, steps=steps)
        return self.flows[key]

    def path_error(self, samples: torch.Tensor, sigma_start: float) -> float:
        """RMS (per coordinate) distance of a deterministic run's samples to the exact ODE solution from the
        same noise and the same first sigma: the solver's own error, with no sampling noise in it."""
        exact = self.exact_flow(sigma_start)
        return float((samples[: self.path_rows] - exact).square().mean().sqrt())

    def _score(self, samples: torch.Tensor, steps: int, nfe: int, path_from: float | None = None) -> Result:
        if not torch.isfinite(samples).all():
            return Result(steps, nfe, float("nan"), float("nan"))
        path = None if path_from is None else self.path_error(samples, path_from)
        return Result(steps, nfe, self.swd(samples), self.gmm.mode_weight_error(samples), path, path_from)

    def inkwash(self, sampler: str, schedule: str, target: int, path: bool = False) -> Result | None:
        """One inkwash run (cached); ``path`` also scores a deterministic sampler against the exact ODE."""
        key = ("inkwash", sampler, schedule, target)
        if key not in self.runs:
            steps = largest_steps(lambda n: inkwash_nfe(sampler, n, schedule), target)
            result = None
            if steps is not None:
                sigmas = build_sigmas(LINEAR, steps, schedule)
                noise_dtype = TWINS[sampler].noise_dtype
                samples, nfe = run_inkwash(self.gmm, sampler, sigmas, self.num_samples, self.seed, noise_dtype)
                exact = path and not SAMPLERS[sampler].stochastic
                result = self._score(samples, steps, nfe, sigmas[0].item() if exact else None)
            self.runs[key] = result
        return self.runs[key]

    def diffusers(self, sampler: str, schedule: str, target: int, path: bool = False) -> Result | None:
        key = ("diffusers", sampler, schedule, target)
        if key not in self.runs:
            twin = TWINS[sampler]
            steps = largest_steps(lambda n: diffusers_nfe(twin, n, schedule), target)
            result = None
            if steps is not None:
                samples, nfe, start = run_diffusers(self.gmm, twin, steps, schedule, self.num_samples, self.seed)
                result = self._score(samples, steps, nfe, start if path and not SAMPLERS[sampler].stochastic else None)
            self.runs[key] = result
        return self.runs[key]


def flow_self_error(bench: Bench) -> float:
    """How far the exact-ODE reference is from one with twice its steps, at the highest start sigma used."""
    if not bench.flows:
        return float("nan")
    (sigma_start, steps), coarse = max(bench.flows.items())
    return float((coarse - bench.exact_flow(sigma_start, 2 * steps)).square().mean().sqrt())


def ink_schedule(sampler: str, choice: str) -> str:
    """inkwash's schedule for a sampler: ``auto`` is the sampler's own default (what ``inkwash sample`` uses)."""
    return get_sampler(sampler).default_schedule if choice == "auto" else choice


def compare(bench: Bench, samplers: list[str], targets: list[int], *, schedule: str, karras: bool) -> list[Row]:
    """The table: every sampler at every target NFE, inkwash on ``schedule`` (``auto``: each sampler's
    default), diffusers on ``table_schedule``."""
    rows = []
    for sampler in samplers:
        twin = TWINS[sampler]
        why_not = twin_unavailable(twin)
        for target in targets:
            started = time.perf_counter()
            ours = bench.inkwash(sampler, ink_schedule(sampler, schedule), target, path=True)
            if ours is None:
                print(f"  {sampler}: no inkwash step count fits {target} NFE", file=sys.stderr)
                continue
            row = Row(
                sampler, target, ours.steps, ours.nfe, ours.swd, ours.mode_error, None, None, None, None, bench.floor
            )
            row.inkwash_path, row.inkwash_start = ours.path_error, ours.start_sigma
            if why_not is not None:
                row.note = why_not
            else:
                theirs = bench.diffusers(sampler, table_schedule(twin, karras), target, path=True)
                if theirs is None:
                    row.note = f"no diffusers step count fits {target} NFE"
                else:
                    row.diffusers_steps, row.diffusers_nfe = theirs.steps, theirs.nfe
                    row.diffusers_swd, row.diffusers_mode_error = theirs.swd, theirs.mode_error
                    row.diffusers_path, row.diffusers_start = theirs.path_error, theirs.start_sigma
            rows.append(row)
            elapsed = time.perf_counter() - started
            print(f"  {sampler:16s} NFE {target:3d}: {elapsed:5.1f} s", file=sys.stderr, flush=True)
    return rows


def best_runs(bench: Bench, side: str, target: int, schedules: dict[str, list[str]]) -> list[dict]:
    """``side``'s runs at ``target`` NFE for each sampler and each of its schedules, best (lowest SWD) first."""
    found = []
    for sampler, names in schedules.items():
        for schedule in names:
            started = time.perf_counter()
            result = getattr(bench, side)(sampler, schedule, target)
            if result is not None and math.isfinite(result.swd):
                found.append({"side": side, "sampler": sampler, "schedule": schedule, **asdict(result)})
            elapsed = time.perf_counter() - started
            print(f"  best search {side} {sampler} {schedule}: {elapsed:5.1f} s", file=sys.stderr, flush=True)
    return sorted(found, key=lambda r: r["swd"])


def format_best(title: str, runs: dict[str, list[dict]], floor: float, top: int) -> str:
    lines = []
    for side in ("inkwash", "diffusers"):
        for rank, run in enumerate(runs[side][:top]):
            label = f"{title:14s} {side:9s}" if rank == 0 else " " * 24
            name = f"{SAMPLERS[run['sampler']].display_name} ({run['schedule']})"
            lines.append(
                f"  {label} {name:26s} steps {run['steps']:3d}, NFE {run['nfe']:3d}, SWD {run['swd']:.5f}, "
                f"SWD/floor {run['swd'] / floor:5.2f}"
            )
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}s}"
    return f"{value:{width}{spec}}"


def _path_ratio(row: Row) -> str:
    if row.inkwash_path is None or row.diffusers_path is None:
        return "-"
    return "start≠" if math.isnan(row.path_ratio) else f"{row.path_ratio:.3f}"


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'sampler':13s} {'target':>6s} {'ink steps/NFE':>13s} {'diff steps/NFE':>14s} {'inkwash SWD':>11s} "
        f"{'diffusers SWD':>13s} {'ink/diff':>8s} {'floor':>8s} {'ink mode':>8s} {'diff mode':>9s} "
        f"{'ink path':>9s} {'diff path':>9s} {'path i/d':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        d_steps = "-" if r.diffusers_steps is None else f"{r.diffusers_steps}/{r.diffusers_nfe}"
        ratio = "-" if r.diffusers_swd is None else f"{r.ratio:8.3f}"
        line = (
            f"{SAMPLERS[r.sampler].display_name:13s} {r.target_nfe:6d} {f'{r.inkwash_steps}/{r.inkwash_nfe}':>13s} "
            f"{d_steps:>14s} {r.inkwash_swd:11.5f} {_fmt(r.diffusers_swd, '.5f', 13)} {ratio:>8s} {r.floor:8.5f} "
            f"{r.inkwash_mode_error:8.4f} {_fmt(r.diffusers_mode_error, '.4f', 9)} "
            f"{_fmt(r.inkwash_path, '.5f', 9)} {_fmt(r.diffusers_path, '.5f', 9)} "
            f"{_path_ratio(r):>8s}"
        )
        if r.note:
            line += f"  ({r.note})"
        lines.append(line)
    return "\n".join(lines)


# ---- overhead per step ----------------------------------------------------------------------------


def _best_time(fn, repeats: int, setup=None) -> float:
    """The fastest of ``repeats`` runs of fn (after ``setup``, untimed), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _calls(model, x: torch.Tensor, arg, count: int):
    def run():
        for _ in range(count):
            model(x, arg)

    return run


def inkwash_overhead(sampler: str, schedule: str, steps: int, repeats: int) -> float:
    """Microseconds per step of the sampler itself: its run with ``x * 0.5`` minus that many calls of it."""
    x = torch.randn(OVERHEAD_SHAPE, generator=torch.Generator().manual_seed(0))
    sigmas = build_sigmas(LINEAR, steps, schedule)
    fn = get_sampler(sampler).fn
    counter = CountingDenoiser(_half)
    fn(counter, x, sigmas)  # warm-up, and the number of model calls
    total = _best_time(lambda: fn(_half, x, sigmas), repeats)
    sigma = torch.full((x.shape[0],), 1.0, dtype=torch.float64)
    model = _best_time(_calls(_half, x, sigma, counter.calls), repeats)
    return max(total - model, 0.0) / steps * 1e6


def diffusers_overhead(twin: Twin, steps: int, repeats: int, schedule: str) -> float:
    """The same for a stock diffusers scheduler: its scale_model_input + step loop (set_timesteps untimed)."""
    x = torch.randn(OVERHEAD_SHAPE, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler(twin, steps, schedule, float64=False)
    kwargs = dict(twin.step_kwargs)

    def loop():
        run_scheduler(sched, _half, x * sched.init_noise_sigma, **kwargs)

    def reset() -> None:  # schedulers keep their step index and history
        sched.set_timesteps(steps)

    reset()
    loop()  # warm-up
    calls = len(sched.timesteps)
    total = _best_time(loop, repeats, setup=reset)
    model = _best_time(_calls(_half, x, None, calls), repeats)
    return max(total - model, 0.0) / steps * 1e6


def overhead(samplers: list[str], schedule: str, steps: int, repeats: int, karras: bool) -> list[dict]:
    results = []
    for sampler in samplers:
        twin = TWINS[sampler]
        ours = inkwash_overhead(sampler, ink_schedule(sampler, schedule), steps, repeats)
        theirs = None
        if twin_unavailable(twin) is None:
            theirs = diffusers_overhead(twin, steps, repeats, table_schedule(twin, karras))
        results.append({"sampler": sampler, "inkwash_us_per_step": ours, "diffusers_us_per_step": theirs})
    return results


def format_overhead(results: list[dict], steps: int) -> str:
    shape = "x".join(map(str, OVERHEAD_SHAPE))
    lines = [
        f"sampler overhead without the model ({shape} float32, {steps} steps, {torch.get_num_threads()} threads)",
        f"{'sampler':13s} {'inkwash us/step':>15s} {'diffusers us/step':>17s} {'ink/diff':>8s}",
    ]
    for r in results:
        ours, theirs = r["inkwash_us_per_step"], r["diffusers_us_per_step"]
        ratio = "-" if theirs is None or theirs <= 0 else f"{ours / theirs:8.2f}"
        lines.append(
            f"{SAMPLERS[r['sampler']].display_name:13s} {ours:15.0f} {_fmt(theirs, '.0f', 17)} {ratio:>8s}"
            + ("  (diffusers skipped)" if theirs is None else "")
        )
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------


def parse_samplers(text: str) -> tuple[list[str], dict[str, str]]:
    """The compared samplers (registry order) and the skipped ones with the reason."""
    wanted = list(SAMPLERS) if text == "all" else [get_sampler(part).id for part in text.split(",") if part.strip()]
    skipped = {s: NO_TWIN[s] for s in wanted if s in NO_TWIN}
    return [s for s in SAMPLERS if s in wanted and s in TWINS], skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", default="5,10,20,50", help="target NFEs, comma separated (default: %(default)s)")
    parser.add_argument("--samplers", default="all", help="comma list of inkwash ids or names (default: all)")
    parser.add_argument("--num-samples", type=int, default=10_000, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--schedule",
        default="auto",
        choices=["auto", *STEP_SCHEDULES],
        help="inkwash's step schedule; auto: each sampler's default, as inkwash sample uses (default: auto)",
    )
    parser.add_argument(
        "--diffusers-karras", action="store_true", help="give diffusers use_karras_sigmas=True where supported"
    )
    parser.add_argument(
        "--gmm",
        default="gmm64",
        help="oracle preset or .npz; gmm48 is held out from the choice of the default schedules (default: %(default)s)",
    )
    parser.add_argument("--overhead-steps", type=int, default=50, help="(default: %(default)s)")
    parser.add_argument("--overhead-repeats", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    parser.add_argument(
        "--no-best-search", action="store_true", help="skip the search over every schedule for the best at NFE ~ 10"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1; more threads stall on a busy machine)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    try:
        samplers, skipped = parse_samplers(args.samplers)
    except ValueError as exc:
        parser.error(str(exc))
    targets = sorted({int(part) for part in args.nfe.split(",") if part.strip()})
    if not targets or min(targets) < 1:
        parser.error("--nfe needs positive integers")
    gmm = load_gmm(args.gmm)
    diffusers = _diffusers()
    for sampler in samplers:
        why_not = twin_unavailable(TWINS[sampler])
        if why_not is not None:
            skipped[sampler] = f"diffusers side skipped: {why_not}"

    started = time.perf_counter()
    bench = Bench(gmm, args.num_samples, args.seed)
    rows = compare(bench, samplers, targets, schedule=args.schedule, karras=args.diffusers_karras)
    compared = [s for s in samplers if twin_unavailable(TWINS[s]) is None]
    d_schedules = {s: table_schedule(TWINS[s], args.diffusers_karras) for s in compared}
    # The best at NFE ~ 10: the table's settings, and (unless --no-best-search) every schedule of each library.
    near = min(targets, key=lambda n: (abs(n - 10), n))
    table_settings = {
        "inkwash": best_runs(bench, "inkwash", near, {s: [ink_schedule(s, args.schedule)] for s in samplers}),
        "diffusers": best_runs(bench, "diffusers", near, {s: [d_schedules[s]] for s in compared}),
    }
    searched = None
    if not args.no_best_search:
        searched = {
            "inkwash": best_runs(bench, "inkwash", near, {s: list(STEP_SCHEDULES) for s in samplers}),
            "diffusers": best_runs(bench, "diffusers", near, {s: diffusers_schedules(TWINS[s]) for s in compared}),
        }
    flow_error = flow_self_error(bench)
    elapsed = time.perf_counter() - started

    print(
        f"{args.gmm} ({gmm}), {args.num_samples} samples, seed {args.seed}; diffusers {diffusers.__version__}, "
        f"linear betas, T = 1000; {torch.get_num_threads()} torch thread(s)"
    )
    print(f"inkwash schedule: {args.schedule}; diffusers schedule: " + ", ".join(sorted(set(d_schedules.values()))))
    print(f"floor (exact vs exact): SWD {bench.floor:.5f}, mode-weight error {bench.floor_mode_error:.4f}")
    print(
        f"path: RMS distance of a deterministic sampler's first {bench.path_rows} samples to the exact ODE solution "
        f"from the same noise (RK4, {PATH_FLOW_STEPS} steps in log sigma; its own error against {2 * PATH_FLOW_STEPS} "
        f"steps: {flow_error:.1e})"
    )
    print()
    print(format_table(rows))
    print("(start≠: the two start from different sigmas, so their path errors are not comparable)")
    print()
    print(f"best at NFE ~ {near} (SWD/floor: 1 is a perfect sampler):")
    print(format_best("table settings", table_settings, bench.floor, 1))
    if searched is not None:
        print(format_best("any schedule", searched, bench.floor, 3))
    for sampler, why in skipped.items():
        print(f"skipped {SAMPLERS[sampler].display_name}: {why}")
    print(f"(comparison took {elapsed:.0f} s)")

    results = None
    if not args.no_overhead:
        results = overhead(samplers, args.schedule, args.overhead_steps, args.overhead_repeats, args.diffusers_karras)
        print()
        print(format_overhead(results, args.overhead_steps))

    if args.json:
        payload = {
            "settings": {**vars(args), "diffusers": diffusers.__version__, "threads": torch.get_num_threads()},
            "floor": {"swd": bench.floor, "mode_error": bench.floor_mode_error},
            "diffusers_schedules": d_schedules,
            "results": [{**asdict(r), "ratio": r.ratio, "path_ratio": r.path_ratio} for r in rows],
            "exact_flow_error": flow_error,
            "best_at_nfe_10": {"target": near, "table_settings": table_settings, "any_schedule": searched},
            "skipped": skipped,
            "overhead": results,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
