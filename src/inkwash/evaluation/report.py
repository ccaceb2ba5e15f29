"""``inkwash eval``: its options, reading the samples (a file, a folder, or a checkpoint to sample), the
scores beside their floors (``evaluate.score_images``), the report table and its JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from inkwash.checkpoint import load_model
from inkwash.core.denoiser import ModelDenoiser
from inkwash.errors import InkwashError
from inkwash.evaluation.evaluate import (
    DEFAULT_METRICS,
    FEATURE_METRICS,
    METRICS,
    MetricSettings,
    class_prior_labels,
    sample_images,
    score_images,
)
from inkwash.evaluation.features import default_features
from inkwash.evaluation.reference import load_image_array, load_reference
from inkwash.files import atomic_write_text
from inkwash.interop.diffusers_folder import is_diffusers_folder
from inkwash.options import check_options, option
from inkwash.sampling.options import (
    device_option,
    inference_device,
    precision_option,
    sampler_option,
    schedule_option,
)

DrawFn = Callable[[int], torch.Tensor]  # seed -> images (N, C, H, W) in [-1, 1]


@dataclass
class EvalOptions:
    """``inkwash eval``: the images (``samples`` or a ``checkpoint`` to sample), the reference and metrics."""

    reference: str = option(help="'digits', a folder of images or an .npz of images")
    samples: str | None = option(
        None, "an .npz of uint8 images (as 'inkwash sample' writes) or a folder", one_of="images"
    )
    checkpoint: str | None = option(
        None,
        "a run directory, or a diffusers DDPM / DDIM / Stable Diffusion folder, to sample (with the sampling "
        "options below)",
        one_of="images",
    )
    num_samples: int | None = option(None, "(default: all of --samples; 1000 from --checkpoint)", minimum=1)
    metrics: tuple[str, ...] = option(DEFAULT_METRICS, f"comma-separated, from {','.join(METRICS)}", choices=METRICS)
    features: str | None = option(
        None,
        "feature network for fid/kid/pr (default: digits for the digits reference, random otherwise)",
        choices=("digits", "random", "inception"),
    )
    inception_weights: str | None = option(
        None,
        "safetensors weights of --features inception, converted from pytorch-fid's .pth "
        "(default: $INKWASH_INCEPTION_WEIGHTS, else pt_inception-2015-12-05.safetensors in the cache directory)",
    )
    sampler: str = sampler_option("")
    steps: int | None = option(None, "(default: 1000 for ddpm, else 50)", minimum=1)
    schedule: str | None = schedule_option("(default: the sampler's own)")
    eta: float | None = option(None, "(default: the sampler's)", minimum=0)
    seed: int = option(0, minimum=0)
    draws: int = option(
        1,
        "--checkpoint: score this many independent draws of --num-samples images (seeds SEED, SEED+1, ...) and "
        "report each metric's mean and its spread over the draws; one draw of 1,000 digits varies by about 7% in FID",
        minimum=1,
        maximum=100,
    )
    batch_size: int = option(250, minimum=1)
    use_ema: bool = option(True, "use the raw weights instead of the EMA", flag="--no-ema")
    nll_terms: int | None = option(
        100, "KL terms of the bound per image, stratified; 999 or more sums all of them", minimum=1
    )
    guidance_scale: float | None = option(
        None,
        "classifier-free guidance for a class-conditional --checkpoint, whose labels follow its "
        "training class frequencies (default: 1.0, plain conditional sampling; 7.5 for Stable Diffusion)",
        minimum=0,
    )
    prompt: str | None = option(None, "a Stable Diffusion --checkpoint: the prompt of every image")
    negative_prompt: str | None = option(None, "a Stable Diffusion --checkpoint: the negative prompt")
    device: str = device_option("--checkpoint: where the network runs; auto is the GPU when there is one")
    precision: str = precision_option(
        "--checkpoint: bf16 or fp16 autocast of the network (fast on GPUs and AMX CPUs); the sampler's "
        "arithmetic stays fp32; bits/dim is always fp32"
    )
    json: str | None = option(None, "also write the report as JSON")
    show_progress: bool = option(True, "progress bars on stderr", cli=False)

    def validate(self) -> None:
        """Each option's type, choices and limits, and exactly one of ``samples`` and ``checkpoint``."""
        check_options(self)


@dataclass
class EvalReport:
    scores: dict[str, float]
    counts: dict[str, int]
    features: str | None
    reference: str
    images: str  # where the samples came from
    seconds: float
    settings: dict = field(default_factory=dict)
    draws: list[dict[str, float]] = field(default_factory=list)  # each draw's scores, when there are several

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def load_samples(path: str | Path) -> torch.Tensor:
    """An .npz of uint8 images, or a folder: its samples.npz (as ``inkwash sample`` writes) or its images."""
    from PIL import Image

    from inkwash.data.loading import load_folder
    from inkwash.data.walk import list_files

    path = Path(path)
    if path.is_dir():
        if (path / "samples.npz").is_file():
            return load_image_array(path / "samples.npz")
        for file in list_files(path):  # the files load_folder reads, so the first readable one sets the shape
            try:
                with Image.open(file) as image:
                    channels = 1 if image.mode in ("L", "1", "I", "I;16") else 3
                    size = min(image.size)
                break
            except (OSError, ValueError, SyntaxError):
                continue
        else:
            raise InkwashError(f"no readable images in {path}")
        return load_folder(path, channels, size, show_progress=False, cache=False).images
    if not path.exists():
        raise InkwashError(f"--samples not found: {path}")
    return load_image_array(path)


def diffusers_folder_sampler(options: EvalOptions, settings: MetricSettings) -> tuple[DrawFn, object]:
    """A function of the seed that draws images (N, C, H, W) in [-1, 1] from a diffusers folder as ``inkwash
    sample`` draws them, and the folder's denoiser for the nll metric (None for Stable Diffusion, whose latent
    model has no pixel likelihood here)."""
    from inkwash.pipeline import Pipeline

    device = inference_device(options.device, options.precision)
    pipe = Pipeline.load(options.checkpoint, device=device, precision=options.precision)
    if pipe.text_conditional and "nll" in settings.metrics:
        raise InkwashError("the nll metric needs a pixel-space model; a Stable Diffusion folder samples latents")

    def draw(seed: int) -> torch.Tensor:
        given = {
            "sampler": options.sampler,
            "steps": options.steps,
            "schedule": options.schedule,
            "eta": options.eta,
            "seed": seed,
            "batch_size": options.batch_size,
            "num_images": options.num_samples or 1000,
            "precision": options.precision,
            "show_progress": options.show_progress,
            "guidance_scale": options.guidance_scale,
            "prompt": options.prompt,
            "negative_prompt": options.negative_prompt,
        }
        return pipe.run(pipe.prepare(pipe.sample_options(**given))).images

    return draw, None if pipe.text_conditional else pipe.denoiser


def run_sampler(options: EvalOptions) -> tuple[DrawFn, ModelDenoiser]:
    """A function of the seed that draws ``num_samples`` images from an inkwash run as ``inkwash sample`` draws
    them (a class-conditional model on labels in its training class proportions, stratified), and its denoiser."""
    for flag, value in (("--prompt", options.prompt), ("--negative-prompt", options.negative_prompt)):
        if value is not None:
            raise InkwashError(f"{flag} needs a text-conditional model (a Stable Diffusion pipeline folder)")
    device = inference_device(options.device, options.precision)
    model, schedule, config = load_model(options.checkpoint, use_ema=options.use_ema)
    denoiser = ModelDenoiser(model.to(device), schedule, config.get("prediction", "eps"))
    num_samples = options.num_samples or 1000
    num_classes = int(config["unet"].get("num_classes", 0))
    counts = (config.get("data") or {}).get("class_counts")

    def draw(seed: int) -> torch.Tensor:
        labels = class_prior_labels(num_classes, counts, num_samples, seed) if num_classes > 0 else None
        return sample_images(
            denoiser,
            config["data"]["shape"],
            num_samples,
            labels=labels,
            guidance_scale=1.0 if options.guidance_scale is None else options.guidance_scale,
            sampler=options.sampler,
            steps=options.steps,
            schedule=options.schedule,
            eta=options.eta,
            seed=seed,
            batch_size=options.batch_size,
            show_progress=options.show_progress,
            precision=options.precision,
        )

    return draw, denoiser


def combine_draws(draws: list[dict[str, float]]) -> dict[str, float]:
    """Each score's mean over the draws; with two or more, also each metric's sample standard deviation over
    them as ``<metric>_draws_sd`` (the floors are the same in every draw)."""
    combined = {key: sum(d[key] for d in draws) / len(draws) for key in draws[0]}
    if len(draws) > 1:
        for key, _, _ in _ROWS:
            if key in combined:
                mean = combined[key]
                combined[key + "_draws_sd"] = (sum((d[key] - mean) ** 2 for d in draws) / (len(draws) - 1)) ** 0.5
    return combined


def run_eval(options: EvalOptions) -> EvalReport:
    """``inkwash eval``: load or draw the samples (``draws`` times), score them, write JSON if asked."""
    started = time.perf_counter()
    settings = MetricSettings(
        metrics=tuple(options.metrics),
        features=options.features,
        inception_weights=options.inception_weights,
        seed=options.seed,
        nll_terms=options.nll_terms,
    )
    settings.validate()
    if (options.samples is None) == (options.checkpoint is None):
        raise InkwashError("give exactly one of --samples and --checkpoint")
    if options.guidance_scale not in (None, 1.0) and options.checkpoint is None:
        raise InkwashError("--guidance-scale applies to --checkpoint sampling, not to --samples")
    if options.draws > 1 and options.checkpoint is None:
        raise InkwashError("--draws applies to --checkpoint sampling; --samples is scored as one draw")
    if options.json is not None and Path(options.json).is_dir():
        raise InkwashError(f"--json must be a file name, got a directory: {options.json}")
    denoiser = None
    if options.samples is not None:
        images = load_samples(options.samples)
        if options.num_samples is not None:
            images = images[: options.num_samples]

        def draw(seed: int) -> torch.Tensor:
            return images

    elif is_diffusers_folder(options.checkpoint):
        draw, denoiser = diffusers_folder_sampler(options, settings)
    else:
        draw, denoiser = run_sampler(options)
    drawn = draw(options.seed)
    reference = load_reference(options.reference, tuple(drawn.shape[1:]), options.show_progress)
    scores, counts = score_images(drawn, reference, settings, denoiser=denoiser, show_progress=options.show_progress)
    per_draw = [scores]
    # nll scores the model on test-half images, not the samples: every draw after the first reuses it.
    model_scores = {key: value for key, value in scores.items() if key.startswith("nll")}
    sample_settings = replace(settings, metrics=tuple(m for m in settings.metrics if m != "nll"))
    for index in range(1, options.draws):
        drawn = draw(options.seed + index)
        scores = {}
        if sample_settings.metrics:
            scores, _ = score_images(drawn, reference, sample_settings, show_progress=options.show_progress)
        per_draw.append({**scores, **model_scores})
    if options.draws > 1:
        counts["draws"] = options.draws
    uses_features = any(m in settings.metrics for m in FEATURE_METRICS)
    report = EvalReport(
        scores=combine_draws(per_draw),
        counts=counts,
        features=(settings.features or default_features(reference.name)) if uses_features else None,
        reference=options.reference,
        images=options.samples if options.samples is not None else options.checkpoint,
        seconds=round(time.perf_counter() - started, 2),
        settings={k: v for k, v in asdict(options).items() if k not in ("show_progress", "json")},
        draws=per_draw if options.draws > 1 else [],
    )
    if options.json:
        atomic_write_text(options.json, report.to_json())
    return report


_ROWS = [  # (key, label, format)
    ("fid", "FID", ".3f"),
    ("kid", "KID", ".5f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("swd", "SWD x1e3 (mean)", ".2f"),
    ("nll_bpd", "NLL bits/dim", ".4f"),
]


def format_table(report: EvalReport) -> str:
    """The scores as a table, each beside its real-data floor."""
    scores, counts = report.scores, report.counts
    rows = []
    for key, label, fmt in _ROWS:
        if key not in scores:
            continue
        spread = f" ± {scores[key + '_std']:{fmt}}" if key + "_std" in scores else ""
        if key + "_draws_sd" in scores:
            spread += f" (sd {scores[key + '_draws_sd']:{fmt}} over {counts['draws']} draws)"
        floor = scores.get(key + "_floor")
        floor_spread = f" ± {scores[key + '_std_floor']:{fmt}}" if key + "_std_floor" in scores else ""
        floor_text = "-" if floor is None else f"{floor:{fmt}}{floor_spread}"
        rows.append((label, f"{scores[key]:{fmt}}{spread}", floor_text))
        if key == "swd":
            levels = sorted(
                (k for k in scores if k.startswith("swd_") and k.endswith("px")), key=lambda k: -int(k[4:-2])
            )
            rows += [(f"  {k[4:]}", f"{scores[k]:{fmt}}", f"{scores[k + '_floor']:{fmt}}") for k in levels]
    header = (
        (f"{counts['draws']} draws of " if "draws" in counts else "")
        + f"{counts['samples']} samples from {report.images} against the test half of {report.reference} "
        f"({counts['reference']} images)" + (f"; features: {report.features}" if report.features else "")
    )
    titles = ("metric", "score", "real-data floor")
    widths = [max(len(r[i]) for r in [titles, *rows]) for i in range(3)]
    lines = [header, "  ".join(h.ljust(w) for h, w in zip(titles, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(
        f"real-data floor: {counts['floor']} images of the reference's train half scored the same way"
        + (f"; NLL on {counts['nll_images']} test-half images" if "nll_images" in counts else "")
        + f"; {report.seconds:.1f}s"
    )
    return "\n".join(lines)
