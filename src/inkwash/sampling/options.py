"""The options of a sampling request and their checks, shared by ``inkwash sample``, ``inkwash eval``
and the Python API: the sampler and its settings, the step schedule, seeds, classes, guidance,
img2img and inpainting, the device and the precision."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from inkwash.core.precision import PRECISION_CHOICES, precision_warning, resolve_precision
from inkwash.core.sigmas import STEP_SCHEDULES
from inkwash.errors import InkwashError
from inkwash.options import check_options, option
from inkwash.sampling.samplers import SAMPLERS, get_sampler
from inkwash.training.config import DEVICES
from inkwash.training.distributed import resolve_device

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}
DEFAULT_PER_CLASS = 8


def sampler_id(name: str) -> str:
    """A sampler's id from its id or its WebUI name, e.g. "Euler a" -> "euler_ancestral"; ValueError if unknown."""
    return get_sampler(name).id


# Options that ``inkwash sample`` and ``inkwash eval --checkpoint`` share: one declaration of their
# choices and spellings, each command with its own help.
def sampler_option(help: str) -> Any:
    return option("ddim", help, choices=SAMPLERS, parse=sampler_id, metavar="SAMPLER")


def schedule_option(help: str) -> Any:
    return option(None, help, choices=STEP_SCHEDULES)


def device_option(help: str = "where the network runs; auto is the GPU when there is one") -> Any:
    return option("auto", help, choices=DEVICES)


def precision_option(
    help: str = "bf16 or fp16 autocast of the network; the sampler's arithmetic stays fp32. auto: bf16 on a CPU "
    "with bf16 instructions (AVX-512 BF16 or AMX), fp32 elsewhere",
) -> Any:
    return option("auto", help, choices=PRECISION_CHOICES)


@dataclass
class SampleOptions:
    checkpoint: str = option(
        help="a run directory, a checkpoint folder, or a diffusers pipeline folder (DDPM, DDIM, Stable Diffusion)"
    )
    out: str = option(help="output directory")
    sampler: str = sampler_option("a sampler id or WebUI name, e.g. ddim, 'Euler a', dpmpp_2m; see 'inkwash samplers'")
    steps: int | None = option(None, "sampler steps (default: 1000 for ddpm, 50 for the others)", minimum=1)
    schedule: str | None = schedule_option("step schedule (default: the sampler's own, listed by 'inkwash samplers')")
    eta: float | None = option(
        None,
        "noise scale of DDIM and the ancestral/SDE samplers; DDIM: 0 deterministic, 1 = DDPM posterior "
        "(default: the sampler's, 0 for DDIM and 1 for the others)",
        minimum=0,
    )
    variance: str | None = option(None, "DDPM variance (default: beta_tilde)", choices=("beta_tilde", "beta"))
    s_churn: float | None = option(None, "Karras et al.'s churn for euler, heun and dpm_2 (default: 0)", minimum=0)
    rho: float = option(7.0, "rho of the karras schedule", exclusive_minimum=0)
    init_image: str | None = option(None, "img2img: start from this image (or folder of images)")
    strength: float = option(
        0.75,
        "img2img: how much of the schedule to run, 0 returns the input, 1 starts from pure noise",
        minimum=0,
        maximum=1,
    )
    mask: str | None = option(
        None,
        "inpainting: a mask image, white = regenerate, black = keep; one of another size than the init "
        "image is resized to it first, as the WebUI does",
    )
    num_images: int = option(64, minimum=1)
    batch_size: int = option(64, minimum=1)
    seed: int = option(0, "image i uses seed S+i", minimum=0)
    subseed: int | None = option(
        None, "variation seed: image i's starting noise is slerped toward that of seed SUBSEED+i", minimum=0
    )
    subseed_strength: float = option(
        0.0, "how far toward the variation seed's noise: 0 none, 1 all of it", minimum=0, maximum=1
    )
    use_ema: bool = option(True, "use the raw weights instead of the EMA", flag="--no-ema")
    clip_denoised: bool = option(True, "do not clip the predicted x0 to [-1, 1] at each step", flag="--no-clip")
    class_label: str | None = option(
        None,
        "class-conditional checkpoints: a class name from the checkpoint (e.g. 3 for digits), an index, "
        "or 'all' (image i gets class i mod the number of classes) (default: unconditional)",
        flag="--class",
        metavar="CLASS",
    )
    negative_class: str | None = option(
        None,
        "class-conditional checkpoints: guidance steers away from this class (it replaces the null label "
        "in classifier-free guidance); needs --guidance-scale other than 1",
        metavar="CLASS",
    )
    guidance_scale: float | None = option(
        None,
        "classifier-free guidance weight w: 0 unconditional, 1 conditional, > 1 stronger; any other w doubles "
        "the model evaluations (default: 1 for class-conditional models, 7.5 for Stable Diffusion)",
        minimum=0,
    )
    prompt: str | None = option(None, "Stable Diffusion folders: the text prompt")
    negative_prompt: str | None = option(
        None, "Stable Diffusion folders: guidance steers away from this prompt (it replaces the empty prompt)"
    )
    emphasis: bool = option(
        True,
        "Stable Diffusion folders: read prompts as diffusers does (at most 75 tokens, no weights) instead of with "
        "the WebUI's syntax: (word:1.3), (word), [word], BREAK, and any length in chunks of 75 tokens",
        flag="--no-emphasis",
    )
    width: int | None = option(
        None,
        "Stable Diffusion folders: image width, a multiple of 8 (default: the model's, or the init image's)",
        minimum=8,
    )
    height: int | None = option(None, "Stable Diffusion folders: image height, a multiple of 8", minimum=8)
    grid_by_class: bool = option(
        False,
        "sample every class: grid.png gets one labelled row of --per-class images per class (replaces --num-images)",
    )
    per_class: int | None = option(None, "images per class with --grid-by-class (default: 8)", minimum=1)
    device: str = device_option()
    precision: str = precision_option()
    compile: bool = option(
        False,
        "torch.compile the network: 15-30 s to start (cached between runs), then about 2x faster sampling on a "
        "CPU with bf16; worth it for long runs",
    )
    strip_points: int = option(8, "columns of reverse.png", minimum=1, cli=False)
    show_progress: bool = option(True, "progress bars on stderr", cli=False)

    def validate(self) -> None:
        """Each option's type, choices and limits (the checks that need a model come when it is loaded)."""
        check_options(self)


def inference_device(device: str, precision: str) -> torch.device:
    """The device to sample on, after checking ``--device`` and ``--precision``; warns (stderr) when
    the precision has no fast kernels here."""
    if precision not in PRECISION_CHOICES:
        raise InkwashError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    try:
        placed = resolve_device(device)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None
    warning = precision_warning(resolve_precision(precision, placed), placed)
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
