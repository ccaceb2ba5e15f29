"""``inkwash demo``: train on digits within a time budget, sample, write every picture, and score the
samples beside the real-data floor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from inkwash.commands.sample import SampleOptions, sample_run
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.data.loading import load_digits
from inkwash.evaluation.report import EvalOptions, format_table, run_eval
from inkwash.files import atomic_write_text
from inkwash.pictures import noising_strip, save_png
from inkwash.training.loop import LOSS_CURVE_FILE, TrainConfig, train

# The demo's training recipe, also used by benchmarks/quality.py. Measured at the demo's budget
# (about 30,000 images seen; FID on the digits features, 500 DDPM-100 samples, floor 0.68): with
# linear betas, batch 32 without dropout scored 2.52, against 3.01 for batch 64, 2.87 for batch 16,
# 2.85 at lr 2e-3 and 5.37 for v-prediction with Min-SNR-5; dropout only slows a run this short.
# Cosine betas (Nichol & Dhariwal 2021, who found the linear schedule wasteful at low resolution)
# brought batch 32 to 1.77 (1.86 with seed 1). Adam's beta2 = 0.99 instead of 0.999 then gave 1.61,
# 1.63 and 1.57 over seeds 0 to 2: second-moment estimates that follow a loss this young more closely.
# Min-SNR-5 weighting of the eps loss (Hang et al. 2023), which stops the nearly clean steps from
# dominating the gradient, then gave 1.35, 1.69 and 1.37 (mean 1.47 against 1.60).
# Class conditioning (label dropout 0.1, so guidance still works) then gave the largest gain of all,
# and input perturbation (DDPM-IP, Ning et al. 2023) at their 0.1 helped on top of it. docs/experiments.md,
# "What limits the FID at this budget" has the figures.
# The demo samples and scores with DDPM respaced to 50 leading steps. With this recipe's models at the
# demo's budget, 50 steps scored better than 100 on four models of four (1,000 samples, floor 0.447;
# 100 / 50 / 25 steps): the make-demo model of 2026-11-26 1.074 / 0.999 / 0.922, the benchmark's seed-0
# model 0.918 / 0.856 / 0.833, and two class-conditional models without input perturbation 0.742 /
# 0.700 / 0.754 and 0.807 / 0.811 / 0.838. 25 steps is as good on the mean but not on every model.
DEMO_DDPM_STEPS = 50
# The demo's class-conditional model samples and scores at guidance scale 0.9, a little of the
# unconditional model mixed in. FID on the same 1,000 DDPM-50 seeds at 0.9 / 1.0 for five bf16 models of
# this recipe (Sapphire Rapids, floor 0.460): the old preset's 5-minute demo 0.776 / 0.816; with the patched
# preset its 5-minute demo 0.755 / 0.782, two equal-time runs 0.749 / 0.776 and 0.600 / 0.637, and a width-64
# run 0.727 / 0.741. Recall rises (0.77 to 0.80 on the demo model) for a little precision; 0.8 was worse
# than 0.9 on all five. Guidance costs two network evaluations per step, so the 1000-step run stays
# unguided, as in Ho et al. docs/experiments.md, "Guidance", has the figures.
DEMO_GUIDANCE_SCALE = 0.9
# The demo's score is the mean FID of three draws of 1,000 samples (seeds SEED, SEED + 1, SEED + 2), not one:
# on one model, one draw's FID varies with the sampling seed by a standard deviation of about 0.05 (7%), as
# much as most of the changes measured in docs/experiments.md. Three draws halve the spread of the mean;
# 1,000 samples per draw keep each draw comparable with the floor's 900 images. docs/experiments.md, "How
# much one score varies", has the figures.
DEMO_EVAL_DRAWS = 3

# Batch 64 at lr 1.4e-3 (since 2026-11-28): on the patched preset a step of 64 costs 0.73x two steps of 32
# (628 against 460 images/s on two threads, Sapphire Rapids), and at equal time (3,900 steps of 64 against
# 5,700 of 32; seeds 0-2, 1,000 samples, floor 0.460) it scored DDPM-50 at guidance 0.9 0.731 / 0.644 / 0.664
# against 0.749 / 0.600 / 0.734 (mean 0.680 against 0.694) and DDIM-50 0.672 / 0.682 / 0.654 against 0.766 /
# 0.825 / 0.718 (mean 0.669 against 0.770). docs/experiments.md, "Levers at the patched preset's budget".
# No augmentation. Non-leaky shifts (`--augment 0.3 --augment-transforms shift`; Karras et al. 2022) were in the
# recipe for one afternoon: at 3,900 steps they scored DDPM-50 at guidance 0.9 0.632 and 0.639 against 0.665 and
# 0.664 (seeds 0 and 1, four draws each), but they cost deterministic DDIM 22% (benchmarks/quality.py at
# 232,384 images, seeds 0 and 1: inkwash's DDIM-50 mean 0.857 against 0.704 without them, ratio to diffusers
# 1.15 against 0.94), and with them the DDPM score is lowest near 3,900 steps and rises after, so they do not
# turn more speed into a better demo either. docs/experiments.md, "Augmentation against copying".
DEMO_RECIPE = {
    "batch_size": 64,
    "lr": 1.4e-3,
    "dropout": 0.0,
    "beta_schedule": "cosine",
    "adam_beta2": 0.99,
    "min_snr_gamma": 5.0,
    "class_cond": True,
    "input_perturbation": 0.1,
}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def run_demo(
    out: str | Path = "demo_out",
    minutes: float = 5.0,
    seed: int = 0,
    *,
    preset: str = "digits",
    num_images: int = 100,
    full_ddpm_images: int = 16,
    eval_samples: int = 1000,
    eval_draws: int = DEMO_EVAL_DRAWS,
) -> dict:
    """Noising strip, a time-boxed training run, three sampling runs, the mean FID of ``eval_draws`` draws of
    ``eval_samples`` DDPM samples (``DEMO_DDPM_STEPS`` steps, as ``benchmarks/quality.py --ddpm-steps`` scores
    them; 0 samples skips it) and a summary in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = 6 if eval_samples else 5
    data = load_digits(16, "train")  # the test half stays held out, as inkwash eval expects

    print(f"1/{parts} the forward process: noising real digits (noising.png)")
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule=DEMO_RECIPE["beta_schedule"]))  # the one it trains on
    examples = torch.stack([data.images[(data.labels == d).nonzero()[0, 0]] for d in range(10)])
    save_png(
        noising_strip(schedule, examples, list(range(0, 1001, 100)), torch.Generator().manual_seed(seed)),
        out / "noising.png",
    )

    print(f"2/{parts} training the {preset} preset for up to {minutes:g} minutes")
    run_dir = out / "run"
    config = TrainConfig(
        data="digits",
        out=str(run_dir),
        preset=preset,
        steps=100_000,
        seed=seed,
        **DEMO_RECIPE,
        checkpoint_every=1000,
        time_limit=minutes * 60,
        overwrite=True,  # the demo's own folder: a second demo replaces the first demo's run
    )
    result = train(config, data=data)
    trained = str(result.checkpoint)  # sample and score exactly the model trained just now

    conditional = bool(DEMO_RECIPE["class_cond"])
    per_class = max(1, num_images // len(data.class_names))
    shown = per_class * len(data.class_names) if conditional else num_images

    def sample(folder: str, sampler: str, steps: int, count: int, by_class: bool = True) -> dict:
        # A class-conditional model draws one labelled grid row per digit; in the short full-DDPM run
        # image i gets digit i mod 10.
        labels = {}
        if conditional:
            labels = {"grid_by_class": True, "per_class": per_class} if by_class else {"class_label": "all"}
        return sample_run(
            SampleOptions(
                checkpoint=trained,
                out=str(out / folder),
                sampler=sampler,
                steps=steps,
                num_images=count,
                batch_size=min(shown if by_class else count, 100),
                seed=seed,
                guidance_scale=DEMO_GUIDANCE_SCALE if conditional and by_class else None,
                **labels,
            )
        )

    what = f"{per_class} of each digit" if conditional else _count(num_images, "digit")
    print(f"3/{parts} sampling {what} with DDPM respaced to {DEMO_DDPM_STEPS} steps (samples/)")
    ddpm = sample("samples", "ddpm", DEMO_DDPM_STEPS, num_images)
    print(f"4/{parts} the same {shown} seeds with deterministic DDIM, 50 steps (samples_ddim/)")
    ddim = sample("samples_ddim", "ddim", 50, num_images)
    print(
        f"5/{parts} sampling {_count(full_ddpm_images, 'digit')} with DDPM over all 1000 steps, as in Ho et al. "
        "(samples_ddpm1000/)"
    )
    full = sample("samples_ddpm1000", "ddpm", 1000, full_ddpm_images, by_class=False)
    scores = fid_line = None
    if eval_samples:
        drawn = f"{_count(eval_draws, 'draw')} of " if eval_draws > 1 else ""
        print(
            f"6/{parts} scoring {drawn}{eval_samples} DDPM-{DEMO_DDPM_STEPS} samples against the digits test half, "
            "beside the real-data floor (eval.json)"
        )
        report = run_eval(
            EvalOptions(
                reference="digits",
                checkpoint=trained,
                num_samples=eval_samples,
                metrics=("fid", "kid", "pr"),
                sampler="ddpm",
                steps=DEMO_DDPM_STEPS,
                seed=seed,
                draws=eval_draws,
                guidance_scale=DEMO_GUIDANCE_SCALE if conditional else None,
                json=str(out / "eval.json"),
            )
        )
        print(format_table(report))
        fid_line = _fid_line(
            report.scores, eval_samples, eval_draws
        )  # from the unrounded scores, as the table prints them
        scores = {key: round(value, 4) for key, value in report.scores.items()}
    summary = {
        "train_steps": result.steps,
        "checkpoint": trained,
        "train_seconds": round(result.seconds, 1),
        "train_images_per_sec": round(result.images_per_sec, 1),
        "parameters": result.num_parameters,
        "loss_first": round(result.first_loss, 4),
        "loss_final": round(result.final_loss, 4),
        "nfe": {f"ddpm_{DEMO_DDPM_STEPS}": ddpm["nfe"], "ddim_50": ddim["nfe"], "ddpm_1000": full["nfe"]},
        "eval": scores,
        "total_seconds": round(time.perf_counter() - started, 1),
        "pictures": {
            "forward noising": str(out / "noising.png"),
            "loss curve": str(run_dir / LOSS_CURVE_FILE),
            f"DDPM samples ({DEMO_DDPM_STEPS} steps)": str(out / "samples" / "grid.png"),
            "DDPM reverse process": str(out / "samples" / "reverse.png"),
            "DDIM samples (50 steps)": str(out / "samples_ddim" / "grid.png"),
            "DDIM reverse process": str(out / "samples_ddim" / "reverse.png"),
            "DDPM samples (1000 steps)": str(out / "samples_ddpm1000" / "grid.png"),
            "DDPM 1000-step reverse process": str(out / "samples_ddpm1000" / "reverse.png"),
        },
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        f"trained {result.steps} steps ({result.num_parameters:,} parameters) in "
        f"{result.seconds:.0f}s at {result.images_per_sec:.0f} images/s; "
        f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}",
        f"model evaluations per image: DDPM {ddpm['nfe']}, DDIM {ddim['nfe']}, full DDPM {full['nfe']}",
        *([fid_line] if fid_line else []),
        *[f"  {name}: {path}" for name, path in summary["pictures"].items()],
        f"total {summary['total_seconds']:.0f}s; summary in {out / 'summary.json'}",
    ]
    print("\n".join(lines))
    return summary


def _fid_line(scores: dict[str, float], count: int, draws: int) -> str:
    ratio = scores["fid"] / scores["fid_floor"]
    over = f"{count} DDPM-{DEMO_DDPM_STEPS} samples"
    if draws > 1:
        over = f"{draws} draws of {over} (mean; sd {scores['fid_draws_sd']:.3f})"
    return (
        f"FID {scores['fid']:.3f} over {over}: {ratio:.2f}x the real-data floor {scores['fid_floor']:.3f} (eval.json)"
    )
