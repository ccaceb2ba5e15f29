"""``inkwash sample``: load a run, sample with a chosen sampler and step schedule, write files."""

from __future__ import annotations

import inspect
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, atomic_write_text, load_model
from .data import load_folder, prepare_image, to_uint8, to_unit_range
from .denoiser import ClampedDenoiser, ModelDenoiser
from .errors import InkwashError
from .img2img import strength_sigmas
from .pictures import reverse_strip, sample_grid, save_png
from .samplers import get_sampler
from .sampling import generate
from .steps import build_sigmas

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}


@dataclass
class SampleOptions:
    checkpoint: str
    out: str
    sampler: str = "ddim"
    steps: int | None = None
    schedule: str = "trailing"
    eta: float | None = None  # None: the sampler's own default
    variance: str | None = None
    s_churn: float | None = None
    rho: float = 7.0
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0
    use_ema: bool = True
    clip_denoised: bool = True
    init_image: str | None = None  # a file or a folder of images (img2img / inpainting)
    strength: float = 0.75
    mask: str | None = None  # white = generate, black = keep
    strip_points: int = 8
    show_progress: bool = True


def sampler_options(sampler: str, **given: object) -> dict:
    """The options the user set (not None), checked against what the sampler accepts."""
    info = get_sampler(sampler)
    accepted = inspect.signature(info.fn).parameters
    options = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            flag = "--" + name.replace("_", "-")
            raise InkwashError(f"{flag} does not apply to the {info.display_name} sampler")
        options[name] = value
    return options


def _read_image(path: Path, channels: int, size: int, what: str) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise InkwashError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return prepare_image(image, channels, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InkwashError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None


def load_init_and_mask(options: SampleOptions, shape: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The init image(s) as (N, C, H, W) in [-1, 1] and the mask as (1, 1, H, W) in {0, 1}."""
    if options.init_image is None:
        if options.mask is not None:
            raise InkwashError("--mask needs --init-image")
        return None, None
    channels, size = shape[0], shape[1]
    path = Path(options.init_image)
    if path.is_dir():
        init = load_folder(path, channels, size, show_progress=options.show_progress).images
    else:
        init = to_unit_range(_read_image(path, channels, size, "init image")[None])
    mask = None
    if options.mask is not None:
        pixels = _read_image(Path(options.mask), 1, size, "mask")  # (H, W, 1)
        mask = torch.from_numpy((pixels[..., 0] > 127).astype(np.float32))[None, None]
    return init, mask


def savez_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def sample_run(options: SampleOptions) -> dict:
    """Sample ``options.num_images`` images and write PNGs, grid.png, samples.npz, reverse.png."""
    info = get_sampler(options.sampler)
    model, schedule, config = load_model(options.checkpoint, use_ema=options.use_ema)
    steps = options.steps or DEFAULT_STEPS.get(info.id, 50)
    if steps > schedule.num_steps:
        raise InkwashError(f"--steps must be at most {schedule.num_steps}, got {steps}")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InkwashError(f"--out must be a directory, got a file: {out}")
    out.mkdir(parents=True, exist_ok=True)

    sigmas = build_sigmas(schedule, steps, options.schedule, rho=options.rho)
    shape = tuple(config["data"]["shape"])
    init, mask = load_init_and_mask(options, shape)
    if init is not None:
        try:
            sigmas = strength_sigmas(sigmas, options.strength)
        except ValueError as exc:
            raise InkwashError(str(exc)) from None
    steps_run = len(sigmas) - 1
    denoiser = ModelDenoiser(model, schedule, config.get("prediction", "eps"))
    if options.clip_denoised:
        denoiser = ClampedDenoiser(denoiser)
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
        num_images=options.num_images,
        batch_size=options.batch_size,
        seed=options.seed,
        sampler_options=sampler_options(info.id, eta=options.eta, variance=options.variance, s_churn=options.s_churn),
        record=record,
        show_progress=options.show_progress,
        on_batch=write_batch,
        init=init,
        mask=mask,
    )
    atomic_write_bytes(out / "samples.npz", savez_bytes(samples=to_uint8(result.images)))
    save_png(sample_grid(result.images), out / "grid.png")
    if result.trajectory:
        save_png(reverse_strip(result.trajectory, result.images), out / "reverse.png")
    summary = {
        "sampler": info.id,
        "schedule": options.schedule,
        "steps": steps,
        "steps_run": steps_run,
        "nfe": result.nfe,
        "num_images": options.num_images,
        "seed": options.seed,
        "checkpoint_step": config.get("step"),
        "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
    }
    atomic_write_text(out / "sampling.json", json.dumps(summary, indent=2) + "\n")
    return summary
