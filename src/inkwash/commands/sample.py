"""``inkwash sample``: load a run, sample with a chosen sampler and step schedule, write files."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from inkwash.checkpoint import load_model
from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.sigmas import build_sigmas
from inkwash.data.loading import load_folder, prepare_image, to_uint8, to_unit_range
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes, atomic_write_text
from inkwash.pictures import reverse_strip, sample_grid, save_png, tile
from inkwash.sampling.generate import generate
from inkwash.sampling.img2img import strength_sigmas
from inkwash.sampling.options import DEFAULT_PER_CLASS, DEFAULT_STEPS, SampleOptions, inference_device, sampler_options
from inkwash.sampling.samplers import get_sampler


def _open_image(path: Path, what: str):
    """The image at ``path``, loaded and turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    if not path.is_file():
        raise InkwashError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InkwashError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None


def _read_image(path: Path, channels: int, size: int, what: str) -> np.ndarray:
    return prepare_image(_open_image(path, what), channels, size)


def _read_mask(path: Path, size: int, init_size: tuple[int, int] | None, show: bool) -> torch.Tensor:
    """The mask as (1, 1, size, size) in {0, 1}. A mask of another size than a single init image is
    first resized to that image's size, as the WebUI does, so that both are cropped to the same region."""
    from PIL import Image

    image = _open_image(path, "mask")
    if init_size is not None and image.size != init_size:
        if show:
            width, height = init_size
            print(f"note: the {image.width}x{image.height} mask was resized to the init image's {width}x{height}")
        image = image.convert("L").resize(init_size, Image.BILINEAR)
    pixels = prepare_image(image, 1, size)  # (H, W, 1)
    return torch.from_numpy((pixels[..., 0] > 127).astype(np.float32))[None, None]


def load_init_and_mask(options: SampleOptions, shape: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The init image(s) as (N, C, H, W) in [-1, 1] and the mask as (1, 1, H, W) in {0, 1}."""
    if options.init_image is None:
        if options.mask is not None:
            raise InkwashError("--mask needs --init-image")
        return None, None
    channels, size = shape[0], shape[1]
    path = Path(options.init_image)
    init_size = None  # a folder's images are each cropped to the model's square, and the mask with them
    if path.is_dir():
        init = load_folder(path, channels, size, show_progress=options.show_progress, cache=False).images
    else:
        image = _open_image(path, "init image")
        init_size = image.size
        init = to_unit_range(prepare_image(image, channels, size)[None])
    mask = None
    if options.mask is not None:
        mask = _read_mask(Path(options.mask), size, init_size, options.show_progress)
    return init, mask


def class_names(config: dict) -> list[str]:
    """The class names of a checkpoint, one per class index; empty for an unconditional model."""
    num_classes = int(config["unet"].get("num_classes", 0))
    names = (config.get("data") or {}).get("class_names") or []
    if len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return [str(name) for name in names]


def resolve_class(value: str, names: list[str]) -> int:
    """A class index from a name (tried first, since names are often digits) or an index."""
    if value in names:
        return names.index(value)
    try:
        index = int(value)
    except ValueError:
        raise InkwashError(
            f"unknown class {value!r}; choose from {', '.join(names)}, an index 0..{len(names) - 1} or 'all'"
        ) from None
    if not 0 <= index < len(names):
        raise InkwashError(f"--class index {index} is out of range 0..{len(names) - 1}")
    return index


def plan_labels(options: SampleOptions, names: list[str]) -> tuple[torch.Tensor | None, int]:
    """The (N,) class label of every image (None: unconditional) and the number of images N."""
    if options.per_class is not None and not options.grid_by_class:
        raise InkwashError("--per-class needs --grid-by-class")
    if not names:
        for flag, used in (
            ("--class", options.class_label is not None),
            ("--grid-by-class", options.grid_by_class),
            ("--guidance-scale", options.guidance_scale != 1.0),
        ):
            if used:
                raise InkwashError(f"{flag} needs a class-conditional checkpoint (train with --class-cond)")
        return None, options.num_images
    if options.grid_by_class:
        if options.class_label is not None:
            raise InkwashError("--grid-by-class samples every class; leave out --class")
        per_class = options.per_class or DEFAULT_PER_CLASS
        if per_class < 1:
            raise InkwashError(f"--per-class must be at least 1, got {per_class}")
        return torch.arange(len(names)).repeat_interleave(per_class), per_class * len(names)
    if options.class_label is None:
        if options.guidance_scale != 1.0:
            raise InkwashError("--guidance-scale needs --class or --grid-by-class")
        return None, options.num_images
    if options.class_label == "all":
        return torch.arange(options.num_images) % len(names), options.num_images
    return torch.tensor([resolve_class(options.class_label, names)]), options.num_images


def savez_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def sample_run(options: SampleOptions) -> dict:
    """Sample ``options.num_images`` images (or ``per_class`` of every class with ``grid_by_class``) and
    write PNGs, grid.png, samples.npz, reverse.png and sampling.json."""
    info = get_sampler(options.sampler)
    if not options.guidance_scale >= 0.0:
        raise InkwashError(f"--guidance-scale must be >= 0, got {options.guidance_scale}")
    device = inference_device(options.device, options.precision)
    model, schedule, config = load_model(options.checkpoint, use_ema=options.use_ema)
    model.to(device)
    names = class_names(config)
    labels, num_images = plan_labels(options, names)
    steps = options.steps or DEFAULT_STEPS.get(info.id, 50)
    if steps > schedule.num_steps:
        raise InkwashError(f"--steps must be at most {schedule.num_steps}, got {steps}")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InkwashError(f"--out must be a directory, got a file: {out}")
    out.mkdir(parents=True, exist_ok=True)

    schedule_name = options.schedule or info.default_schedule
    sigmas = build_sigmas(schedule, steps, schedule_name, rho=options.rho)
    shape = tuple(config["data"]["shape"])
    init, mask = load_init_and_mask(options, shape)
    if init is not None:
        try:
            sigmas = strength_sigmas(sigmas, options.strength)
        except ValueError as exc:
            raise InkwashError(str(exc)) from None
    steps_run = len(sigmas) - 1
    denoiser = ModelDenoiser(model, schedule, config.get("prediction", "eps"))
    record = sorted(
        {round(i * (steps_run - 1) / max(1, options.strip_points - 1)) for i in range(options.strip_points)}
    )

    def write_batch(start: int, images: torch.Tensor) -> None:
        from PIL import Image

        for offset, pixels in enumerate(to_uint8(images)):
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            save_png(image, out / f"{start + offset:06d}.png")

    result = generate(
        denoiser,
        shape,
        sigmas,
        sampler=info.id,
        num_images=num_images,
        batch_size=options.batch_size,
        seed=options.seed,
        sampler_options=sampler_options(info.id, eta=options.eta, variance=options.variance, s_churn=options.s_churn),
        record=record,
        show_progress=options.show_progress,
        on_batch=write_batch,
        init=init,
        mask=mask,
        labels=labels,
        guidance_scale=options.guidance_scale,
        null_label=len(names) or None,
        clip_denoised=options.clip_denoised,
        device=device,
        precision=options.precision,
    )
    atomic_write_bytes(out / "samples.npz", savez_bytes(samples=to_uint8(result.images)))
    if options.grid_by_class:
        per_class = num_images // len(names)
        rows = [to_uint8(result.images[c * per_class : (c + 1) * per_class]) for c in range(len(names))]
        save_png(tile(rows, row_labels=names), out / "grid.png")
    else:
        save_png(sample_grid(result.images), out / "grid.png")
    if result.trajectory:
        save_png(reverse_strip(result.trajectory, result.images), out / "reverse.png")
    summary = {
        "sampler": info.id,
        "schedule": schedule_name,
        "steps": steps,
        "steps_run": steps_run,
        "nfe": result.nfe,
        "num_images": num_images,
        "seed": options.seed,
        "guidance_scale": options.guidance_scale,
        "class_names": names or None,
        "labels": None if labels is None else [int(label) for label in labels.expand(num_images)],
        "checkpoint_step": config.get("step"),
        "device": str(device),
        "precision": options.precision,
        "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
    }
    atomic_write_text(out / "sampling.json", json.dumps(summary, indent=2) + "\n")
    return summary
