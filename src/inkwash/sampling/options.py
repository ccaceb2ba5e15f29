"""The options of a sampling request and their checks, shared by ``inkwash sample``, ``inkwash eval``
and the Python API: the sampler and its settings, the step schedule, seeds, classes, guidance,
img2img and inpainting, the device and the precision."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch

from inkwash.core.precision import PRECISIONS, precision_warning
from inkwash.errors import InkwashError
from inkwash.sampling.samplers import get_sampler
from inkwash.training.distributed import resolve_device

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}
DEFAULT_PER_CLASS = 8


@dataclass
class SampleOptions:
    checkpoint: str
    out: str
    sampler: str = "ddim"
    steps: int | None = None
    schedule: str | None = None  # None: the sampler's default_schedule
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
    class_label: str | None = None  # a class name, an index, or "all" (image i gets class i mod K)
    guidance_scale: float = 1.0  # classifier-free guidance weight w; 1 = plain conditional sampling
    grid_by_class: bool = False  # one grid row of per_class images for every class
    per_class: int | None = None  # images per class with grid_by_class (None: DEFAULT_PER_CLASS)
    device: str = "auto"  # auto: the GPU when there is one
    precision: str = "fp32"  # bf16 / fp16 autocast the network; the sampler's arithmetic stays fp32
    show_progress: bool = True


def inference_device(device: str, precision: str) -> torch.device:
    """The device to sample on, after checking ``--device`` and ``--precision``; warns (stderr) when
    the precision has no fast kernels here."""
    if precision not in PRECISIONS:
        raise InkwashError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        placed = resolve_device(device)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None
    warning = precision_warning(precision, placed)
    if warning:
        print(warning, file=sys.stderr)
    return placed


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
