"""``inkwash bench samplers``: every sampler against the exact denoiser of a Gaussian mixture.

For each sampler and step count it reports the NFE used, the sliced Wasserstein distance between
the generated samples and exact data samples, the same distance between two exact sample sets (the
floor: what a perfect sampler would score with this many samples), and the error in mode weights.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import build_sigmas
from inkwash.errors import InkwashError
from inkwash.evaluation.distances import sliced_wasserstein
from inkwash.evaluation.oracle import GaussianMixture
from inkwash.files import atomic_write_bytes, atomic_write_text
from inkwash.progress import progress
from inkwash.sampling.generate import CountingDenoiser
from inkwash.sampling.samplers import SAMPLERS, get_sampler


@dataclass
class BenchRow:
    sampler: str
    steps: int
    nfe: int
    swd: float
    floor: float
    mode_error: float


def run_sampler(
    gmm: GaussianMixture,
    sampler: str,
    sigmas: torch.Tensor,
    num_samples: int,
    seed: int,
    options: dict | None = None,
) -> tuple[torch.Tensor, int]:
    """Samples (N, D) float64 from one sampler run on the oracle, and the NFE it used."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, gmm.dim, generator=generator, dtype=torch.float64)
    x = x * math.sqrt(1.0 + sigmas[0].item() ** 2)
    counter = CountingDenoiser(gmm)
    out = get_sampler(sampler).fn(
        counter,
        x,
        sigmas,
        noise=lambda: torch.randn(num_samples, gmm.dim, generator=generator, dtype=torch.float64),
        **(options or {}),
    )
    return out, counter.calls


def bench_samplers(
    gmm: GaussianMixture,
    samplers: list[str],
    steps: list[int],
    *,
    schedule: str | None = None,
    beta_schedule: str = "linear",
    num_samples: int = 10_000,
    seed: int = 0,
    save_samples: str | Path | None = None,
    show_progress: bool = True,
) -> list[BenchRow]:
    noise_schedule = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule))
    reference, _ = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 1))
    other, _ = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 2))
    projections = torch.Generator().manual_seed(seed + 3)
    floor = sliced_wasserstein(other, reference, generator=projections)
    rows = []
    jobs = [(s, n) for s in samplers for n in steps]
    for sampler, n in progress(jobs, desc="bench samplers", unit="run", disable=not show_progress):
        sigmas = build_sigmas(noise_schedule, n, schedule or get_sampler(sampler).default_schedule)
        samples, nfe = run_sampler(gmm, sampler, sigmas, num_samples, seed)
        if not torch.isfinite(samples).all():
            swd = mode_error = float("nan")
        else:
            swd = sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(seed + 3))
            mode_error = gmm.mode_weight_error(samples)
        rows.append(BenchRow(sampler, n, nfe, swd, floor, mode_error))
        if save_samples is not None:
            buffer = io.BytesIO()
            np.save(buffer, samples.float().numpy())
            atomic_write_bytes(Path(save_samples) / f"{sampler}_{n}.npy", buffer.getvalue())
    return rows


def format_table(rows: list[BenchRow]) -> str:
    lines = [f"{'sampler':20s} {'steps':>5s} {'NFE':>5s} {'SWD':>9s} {'floor':>9s} {'SWD/floor':>9s} {'mode err':>8s}"]
    for r in rows:
        ratio = r.swd / r.floor if r.floor > 0 else float("nan")
        lines.append(
            f"{r.sampler:20s} {r.steps:5d} {r.nfe:5d} {r.swd:9.5f} {r.floor:9.5f} {ratio:9.2f} {r.mode_error:8.4f}"
        )
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str | Path, title: str) -> None:
    """SWD against NFE for each sampler, log-log, with the exact-sample floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for sampler in dict.fromkeys(r.sampler for r in rows):
        points = [(r.nfe, r.swd) for r in rows if r.sampler == sampler and math.isfinite(r.swd)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", lw=1, ms=3, label=SAMPLERS[sampler].display_name)
    if rows:
        ax.axhline(rows[0].floor, color="k", ls="--", lw=1, label="floor (exact vs exact)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("sliced Wasserstein distance")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(rows: list[BenchRow], path: str | Path, settings: dict) -> None:
    payload = {"settings": settings, "results": [asdict(r) for r in rows]}
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=True) + "\n")


def parse_samplers(text: str) -> list[str]:
    if text == "all":
        return list(SAMPLERS)
    try:
        return [get_sampler(part).id for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InkwashError(str(exc)) from None
