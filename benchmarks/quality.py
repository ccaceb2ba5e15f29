"""Sample quality after equal training: inkwash against a diffusers baseline of the same size.

Trains the digits preset for a fixed budget of images seen, twice: with inkwash (``train.train``, with its
default precision for the machine) and with a diffusers ``UNet2DModel`` of the same widths, levels, attention
and time conditioning (``throughput.diffusers_twin`` with ``resnet_time_scale_shift="scale_shift"``, so the
parameter counts agree) in fp32 on ``DDPMScheduler`` noise, with the same data order, optimizer (AdamW),
learning rate, warm-up, gradient clipping, batch size and EMA. Samples the EMA weights of each with 50-step
DDIM (inkwash's sampler; diffusers' ``DDIMScheduler``), both with the same timesteps (``--ddim-spacing``,
trailing by default) and x0 clipped to [-1, 1], and reports FID and KID on the offline digits features beside
the real-data floor, with the ratio inkwash / baseline (below 1: inkwash's samples are closer to the data).

    python benchmarks/quality.py [--images 30000] [--num-samples 1000] [--ddpm-steps 100] [--json out.json]
    python benchmarks/quality.py --seed 1 --json s1.json     # another training seed (data order, init, noise)
    python benchmarks/quality.py --summarize s0.json s1.json s2.json   # mean over seeds, ratio of the means

Both train with the demo's recipe (``inkwash.commands.demo.DEMO_RECIPE``: batch size, learning rate, dropout, betas,
Adam's beta2, the Min-SNR loss weighting, input perturbation and class conditioning with label dropout);
non-leaky augmentation (``--augment``, off in the demo's recipe) is inkwash's alone, since UNet2DModel has no
input for its labels. A class-conditional pair samples on the same labels, stratified by the train half's class
frequencies (``inkwash.evaluation.evaluate.class_prior_labels``). ``--ddpm-steps N`` also samples both with DDPM
respaced to N steps, the demo's own sampler at N = 50 (``inkwash.commands.demo.DEMO_DDPM_STEPS``).

A preset with a patch size (space-to-depth input) is compared with an unpatched twin at full resolution:
``UNet2DModel`` has no such input. Equal images then cost inkwash less time, so a ratio at or below 1 means
at least equal quality at equal training time; ``--patch-size 1`` trains inkwash unpatched.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from inkwash.checkpoint import load_model
from inkwash.commands.demo import DEMO_RECIPE
from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.unet import count_parameters, preset
from inkwash.data.augment import TRANSFORMS as AUGMENT_TRANSFORMS
from inkwash.data.loading import load_digits
from inkwash.evaluation.evaluate import MetricSettings, class_prior_labels, sample_images, score_images
from inkwash.evaluation.reference import load_reference
from inkwash.training.loop import EpochSampler, TrainConfig, ema_update, make_optimizer, train
from inkwash.training.objectives import min_snr_weight
from throughput import diffusers_twin

DIFFUSERS_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # diffusers' names for the same betas


def twin_config(args):
    """The layout the diffusers twin copies: inkwash's widths, levels and attention, at full resolution
    (UNet2DModel has no space-to-depth input, so a patched inkwash network is compared with its unpatched twin)."""
    overrides = {"dropout": args.dropout}
    if args.base_channels:
        overrides["base_channels"] = args.base_channels
    return preset(args.preset, **overrides)


def train_inkwash(args, data, steps: int) -> tuple[ModelDenoiser, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(
            data="digits",
            out=run_dir,
            preset=args.preset,
            patch_size=args.patch_size,
            base_channels=args.base_channels,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            dropout=args.dropout,
            adam_beta2=args.adam_beta2,
            min_snr_gamma=args.min_snr_gamma,
            input_perturbation=args.input_perturbation,
            augment=args.augment,
            augment_transforms=args.augment_transforms,
            beta_schedule=args.beta_schedule,
            warmup_steps=args.warmup_steps,
            ema_decay=args.ema_decay,
            class_cond=args.class_cond,
            cond_drop=args.cond_drop,
            seed=args.seed,
            checkpoint_every=steps,
        )
        result = train(config, data=data, show_progress=not args.quiet)
        model, schedule, _ = load_model(run_dir)  # the EMA weights
    return ModelDenoiser(model, schedule), result.seconds


def train_diffusers(args, data, steps: int):
    """The same loop as inkwash's trainer, on a diffusers UNet2DModel with DDPMScheduler.add_noise."""
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    num_classes = len(data.class_names) if args.class_cond else 0
    # diffusers' class embedding is added to the time embedding, as inkwash's; index num_classes = "no class".
    model = diffusers_twin(
        twin_config(args),
        num_class_embeds=num_classes + 1 if num_classes else None,
        resnet_time_scale_shift="scale_shift",  # inkwash's time conditioning: equal parameter counts
    )
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[args.beta_schedule])
    optimizer = make_optimizer(model, args.lr, betas=(TrainConfig.adam_beta1, args.adam_beta2))  # as inkwash's
    batches = EpochSampler(len(data), args.batch_size, generator)
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.warmup_steps))
        index = batches.next()
        x0 = data.images[index]  # (B, C, H, W)
        labels = None
        if num_classes:  # label dropout for classifier-free guidance, as inkwash's --cond-drop
            labels = data.labels[index]
            dropped = torch.rand(labels.shape, generator=generator) < args.cond_drop
            labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        model_noise = noise
        if args.input_perturbation:  # as diffusers' training examples' --input_perturbation: target stays noise
            model_noise = noise + args.input_perturbation * torch.randn(x0.shape, generator=generator)
        output = model(scheduler.add_noise(x0, model_noise, t), t, class_labels=labels).sample
        per_sample = (output - noise).pow(2).flatten(1).mean(1)
        if args.min_snr_gamma is None:
            loss = per_sample.mean()
        else:  # the same Min-SNR weighting as diffusers' own training examples (--snr_gamma)
            alpha_bar = scheduler.alphas_cumprod[t].double()
            weight = min_snr_weight(alpha_bar / (1 - alpha_bar), args.min_snr_gamma, "eps")
            loss = (per_sample * weight.float()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
    return ema, time.perf_counter() - started


@torch.no_grad()
def sample_diffusers(
    model,
    shape,
    num_samples: int,
    steps: int,
    seed: int,
    sampler: str = "ddim",
    beta_schedule: str = "linear",
    batch_size: int = 250,
    spacing: str = "trailing",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (eta 0, ``spacing`` timesteps) or DDPM respaced to ``steps`` (leading), x0 clipped to [-1, 1].
    ``labels`` (N,) condition a class-conditional model, sample i on row i."""
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = DIFFUSERS_BETAS[beta_schedule]
    if sampler == "ddim":
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule=betas, clip_sample=True, timestep_spacing=spacing
        )
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=betas, clip_sample=True)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, batch_size):
        scheduler.set_timesteps(steps)
        x = torch.randn(min(batch_size, num_samples - start), *shape, generator=generator)
        batch_labels = None if labels is None else labels[start : start + x.shape[0]]
        for t in scheduler.timesteps:
            output = model(x, t, class_labels=batch_labels).sample
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        chunks.append(x.clamp(-1, 1))
    return torch.cat(chunks)


def summarize(paths: list[str]) -> dict:
    """Mean scores over runs with different seeds, and the ratio of the means inkwash / baseline.

    One training run per side leaves the ratio at the mercy of each network's run-to-run spread;
    the mean over seeds (each run's --json) says which side is ahead on average."""
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            runs.append(json.load(handle))
    summary: dict = {"seeds": [run.get("seed") for run in runs], "sampling": {}}
    floor = [run["sampling"][next(iter(run["sampling"]))]["inkwash"]["fid_floor"] for run in runs]
    summary["fid_floor"] = sum(floor) / len(floor)
    print(f"{len(runs)} runs (seeds {summary['seeds']}), {runs[0]['images_seen']} images seen each")
    names = [name for name in runs[0]["sampling"] if all(name in run["sampling"] for run in runs)]
    for name in names:
        print(f"\n{name}: per seed inkwash / diffusers (ratio), then the means")
        entry = {}
        for key in ("fid", "kid"):
            ours = [run["sampling"][name]["inkwash"][key] for run in runs]
            theirs = [run["sampling"][name]["diffusers"][key] for run in runs]
            per_seed = "  ".join(f"{a:.3f}/{b:.3f} ({a / b:.2f})" for a, b in zip(ours, theirs, strict=True))
            mean_ours, mean_theirs = sum(ours) / len(ours), sum(theirs) / len(theirs)
            entry[key] = {
                "inkwash": ours,
                "diffusers": theirs,
                "mean_inkwash": mean_ours,
                "mean_diffusers": mean_theirs,
                "ratio_of_means": mean_ours / mean_theirs,
                "wins": sum(a <= b for a, b in zip(ours, theirs, strict=True)),
            }
            print(
                f"{key.upper():4s} {per_seed}   mean {mean_ours:.3f}/{mean_theirs:.3f} "
                f"ratio {mean_ours / mean_theirs:.2f}, inkwash ahead in {entry[key]['wins']} of {len(runs)}"
            )
        entry["fid"]["mean_over_floor"] = entry["fid"]["mean_inkwash"] / summary["fid_floor"]
        summary["sampling"][name] = entry
    print(f"\nmean FID floor {summary['fid_floor']:.4f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30_000, help="training images seen by each (default: 30000)")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples drawn from each (default: 1000)")
    parser.add_argument("--preset", default="digits")
    parser.add_argument(
        "--patch-size", type=int, default=None, help="inkwash's patch size (default: the preset's); diffusers' is 1"
    )
    parser.add_argument("--base-channels", type=int, default=None, help="both networks' width (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=DEMO_RECIPE["batch_size"], help="(default: the demo's)")
    parser.add_argument("--lr", type=float, default=DEMO_RECIPE["lr"], help="(default: the demo's)")
    parser.add_argument("--dropout", type=float, default=DEMO_RECIPE["dropout"], help="(default: the demo's)")
    parser.add_argument(
        "--adam-beta2", type=float, default=DEMO_RECIPE["adam_beta2"], help="AdamW's beta2 on both sides (the demo's)"
    )
    parser.add_argument(
        "--min-snr-gamma",
        type=float,
        default=DEMO_RECIPE["min_snr_gamma"],
        help="Min-SNR-gamma loss weighting on both sides (default: the demo's); 0 turns it off",
    )
    parser.add_argument(
        "--beta-schedule",
        default=DEMO_RECIPE["beta_schedule"],
        choices=sorted(DIFFUSERS_BETAS),
        help="(default: the demo's)",
    )
    parser.add_argument(
        "--input-perturbation",
        type=float,
        default=DEMO_RECIPE.get("input_perturbation", 0.0),
        help="DDPM-IP gamma on both sides (default: the demo's); 0 turns it off",
    )
    parser.add_argument(
        "--augment",
        type=float,
        default=DEMO_RECIPE.get("augment", 0.0),
        help="inkwash's non-leaky augmentation probability (default: the demo's); inkwash only, since "
        "UNet2DModel has no input for augmentation labels; 0 turns it off",
    )
    parser.add_argument(
        "--augment-transforms",
        default=DEMO_RECIPE.get("augment_transforms", ",".join(AUGMENT_TRANSFORMS)),
        help="the transforms --augment uses (default: the demo's, else all four)",
    )
    parser.add_argument(
        "--class-cond",
        action=argparse.BooleanOptionalAction,
        default=DEMO_RECIPE.get("class_cond", False),
        help="class-conditional training on both sides, sampled on labels drawn from the train half's class "
        "frequencies (default: the demo's)",
    )
    parser.add_argument("--cond-drop", type=float, default=0.1, help="label dropout on both sides (default: 0.1)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument(
        "--ddim-spacing",
        default="trailing",
        help="DDIM timesteps on both sides: trailing (starts at t = 999), leading (both libraries' default, "
        "starts at 980 for 50 steps) or both, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--ddpm-steps",
        type=int,
        default=0,
        help="also sample both with DDPM respaced to this many steps (the demo's sampler is DDPM at 100)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="only summarize earlier runs' --json files over their seeds"
    )
    args = parser.parse_args()
    if args.min_snr_gamma is not None and args.min_snr_gamma < 0:
        parser.error("--min-snr-gamma must be positive, or 0 for no weighting")
    args.min_snr_gamma = args.min_snr_gamma or None
    bad = set(args.ddim_spacing.split(",")) - {"leading", "trailing", "linspace"}
    if bad:
        parser.error(f"--ddim-spacing: unknown {', '.join(sorted(bad))}; use leading, trailing or linspace")
    if args.summarize:
        summary = summarize(args.summarize)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2)
        return

    config = preset(args.preset)
    shape = (config.in_channels, config.image_size, config.image_size)
    data = load_digits(config.image_size, "train")  # the test half is the reference
    steps = max(1, args.images // args.batch_size)
    ours, ours_seconds = train_inkwash(args, data, steps)
    theirs, theirs_seconds = train_diffusers(args, data, steps)
    reference = load_reference("digits", shape)
    settings = MetricSettings(metrics=("fid", "kid"), seed=args.seed)
    # The same labels for both sides, drawn from the class prior, as inkwash eval draws them.
    labels = (
        class_prior_labels(len(data.class_names), data.class_counts(), args.num_samples, args.seed)
        if args.class_cond
        else None
    )
    # DDIM with the same timesteps on both sides (trailing by default); DDPM respaced (leading) on both.
    runs = [("ddim", args.sample_steps, spacing) for spacing in args.ddim_spacing.split(",")] + (
        [("ddpm", args.ddpm_steps, "leading")] if args.ddpm_steps else []
    )
    result = {
        "preset": args.preset,
        "seed": args.seed,
        "images_seen": steps * args.batch_size,
        "steps": steps,
        "batch_size": args.batch_size,
        "dropout": args.dropout,
        "adam_beta2": args.adam_beta2,
        "min_snr_gamma": args.min_snr_gamma,
        "input_perturbation": args.input_perturbation,
        "inkwash_augment": {"probability": args.augment, "transforms": args.augment_transforms},
        "beta_schedule": args.beta_schedule,
        "class_cond": args.class_cond,
        "patch_size": ours.network.config.patch_size,
        "base_channels": ours.network.config.base_channels,
        "parameters": {"inkwash": count_parameters(ours.network), "diffusers": count_parameters(theirs)},
        "train_seconds": {"inkwash": round(ours_seconds, 1), "diffusers": round(theirs_seconds, 1)},
        "sampling": {},
    }
    print(
        f"{args.preset} preset (inkwash patch size {result['patch_size']}, width {result['base_channels']}; "
        f"parameters: inkwash {result['parameters']['inkwash']:,}, diffusers {result['parameters']['diffusers']:,}), "
        f"{result['images_seen']} images seen ({steps} steps of {args.batch_size}, dropout "
        f"{args.dropout:g}, {args.beta_schedule} betas, Adam beta2 {args.adam_beta2:g}, Min-SNR gamma "
        f"{args.min_snr_gamma}, input perturbation {args.input_perturbation:g}"
        f"{', class-conditional' if args.class_cond else ''}"
        f"{f'; inkwash only: augment {args.augment:g} ({args.augment_transforms})' if args.augment else ''}); "
        f"{args.num_samples} samples "
        "each, against the test half of digits; digits features"
    )
    for sampler, sample_steps, schedule in runs:
        ours_images = sample_images(
            ours.eval(),
            shape,
            args.num_samples,
            sampler=sampler,
            steps=sample_steps,
            schedule=schedule,
            seed=args.seed,
            show_progress=not args.quiet,
            labels=labels,
        )
        theirs_images = sample_diffusers(
            theirs,
            shape,
            args.num_samples,
            sample_steps,
            args.seed,
            sampler,
            args.beta_schedule,
            spacing=schedule,
            labels=labels,
        )
        ours_scores, counts = score_images(ours_images, reference, settings, show_progress=not args.quiet)
        theirs_scores, _ = score_images(theirs_images, reference, settings)
        ratio = {key: ours_scores[key] / theirs_scores[key] for key in ("fid", "kid")}
        name = f"{sampler}_{sample_steps}" + (f"_{schedule}" if sampler == "ddim" and schedule != "trailing" else "")
        result["sampling"][name] = {"inkwash": ours_scores, "diffusers": theirs_scores, "ratio": ratio}
        result["counts"] = counts
        print(f"\n{sampler.upper()} {sample_steps} {schedule} steps ({counts['reference']} reference images)")
        print(f"{'':6s} {'inkwash':>12s} {'diffusers':>12s} {'ratio':>7s} {'real-data floor':>16s} {'ink/floor':>9s}")
        for key in ("fid", "kid"):
            floor = ours_scores[key + "_floor"]
            print(
                f"{key.upper():6s} {ours_scores[key]:12.4f} {theirs_scores[key]:12.4f} {ratio[key]:7.2f} "
                f"{floor:16.4f} " + (f"{ours_scores[key] / floor:9.2f}" if key == "fid" else f"{'-':>9s}")
            )
    print(f"training seconds: inkwash {ours_seconds:.0f}, diffusers {theirs_seconds:.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
