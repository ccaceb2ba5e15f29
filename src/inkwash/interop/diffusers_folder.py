"""Load a diffusers pixel-space pipeline folder (``DDPMPipeline`` / ``DDIMPipeline.save_pretrained``) as a
``Pipeline``, so that ``inkwash.load(path)`` and ``inkwash sample --checkpoint path`` sample it with every
inkwash sampler.

The folder's ``unet/`` becomes the network (a ``diffusers.UNet2DModel``, read from safetensors only) and its
``scheduler/scheduler_config.json`` the ``NoiseSchedule``. Only what defines the trained model is read from the
scheduler: its training timesteps, betas and prediction type. A field that cannot be mapped exactly raises an
``InkwashError``; nothing is approximated.

Of the scheduler's sampling settings, ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``,
``clip_sample`` and ``clip_sample_range`` are recorded under ``config["sampling"]`` and become the folder's
defaults, read by ``Pipeline.prepare`` (a ``schedule`` or ``clip_denoised`` given per call wins):
``timestep_spacing`` is the default step schedule of every sampler ("leading", "trailing", "linspace" ->
"uniform"); ``steps_offset`` shifts the "leading" timesteps, as diffusers does; ``set_alpha_to_one`` false makes
DDIM's and PLMS's last step land on alpha_bar[0] (sigma_min) rather than on sigma 0, as diffusers' DDIM and PNDM
do; and ``clip_denoised`` defaults to ``clip_sample`` when ``clip_sample_range`` is 1 (inkwash clips to [-1, 1]
only; with another range it defaults to no clipping). Others (``variance_type`` "fixed_*", ...) are not read.
diffusers is imported only when such a folder is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.errors import InkwashError

if TYPE_CHECKING:
    from inkwash.pipeline import Pipeline

INDEX_FILE = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SUPPORTED_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# diffusers' beta_schedule -> inkwash's name for the same betas (checked equal in tests/test_diffusers_folder.py)
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
    "sigmoid": "sigmoid",
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Scheduler fields that change the trained model's schedule or output, with the value inkwash can follow.
REQUIRED_VALUES = {"trained_betas": None, "timestep_type": "discrete"}
# diffusers' timestep_spacing -> inkwash's step schedule with the same timesteps (tests/test_diffusers_agreement.py)
SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "uniform"}


def is_bare_unet_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``UNet2DModel.save_pretrained`` (its config.json names the class;
    an inkwash checkpoint's config.json has no ``_class_name``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("_class_name") == "UNet2DModel"


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by a diffusers pipeline's ``save_pretrained``, or a bare
    ``UNet2DModel`` folder (which needs a scheduler config beside it)."""
    return (Path(path) / INDEX_FILE).is_file() or is_bare_unet_folder(path)


def bare_scheduler_config(path: Path) -> Path:
    """The scheduler config of a bare UNet2DModel folder: scheduler_config.json in it (the layout of
    google/ddpm-cifar10-32's first uploads), else scheduler/ in it or beside it."""
    for candidate in (
        path / "scheduler_config.json",
        path / "scheduler" / "scheduler_config.json",
        path.parent / "scheduler" / "scheduler_config.json",
    ):
        if candidate.is_file():
            return candidate
    raise InkwashError(
        f"{path}: a bare UNet2DModel folder needs a scheduler config: scheduler_config.json in it, or a scheduler/"
        " folder in it or beside it"
    )


def is_stable_diffusion_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers folder of a Stable Diffusion pipeline (``inkwash.interop.stable_diffusion``)."""
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        kind = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(kind, str) and kind.startswith("StableDiffusion")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InkwashError(f"{path.parent.parent}: missing {what} ({path.parent.name}/{path.name})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InkwashError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InkwashError(f"{path} is not a JSON object")
    return data


def _choice(config: dict, field: str, default: str, choices: dict, where: str) -> str:
    """A scheduler field that must be one of ``choices``' keys; a one-line error names it otherwise."""
    value = config.get(field, default)
    if value not in choices:
        raise InkwashError(
            f"{where}: scheduler field {field}={value!r} is not supported (choose from {', '.join(choices)})"
        )
    return value


def schedule_from_config(config: dict, where: str) -> tuple[NoiseSchedule, str]:
    """inkwash's ``NoiseSchedule`` and prediction ("eps", "v" or "x0") for a diffusers scheduler config."""
    for field, allowed in REQUIRED_VALUES.items():
        value = config.get(field, allowed)
        if value != allowed:
            shown = "a list of betas" if field == "trained_betas" else repr(value)
            raise InkwashError(f"{where}: scheduler field {field}={shown} is not supported (only {allowed!r})")
    beta_schedule = _choice(config, "beta_schedule", "linear", BETA_SCHEDULES, where)
    prediction_type = _choice(config, "prediction_type", "epsilon", PREDICTIONS, where)
    num_steps = config.get("num_train_timesteps", 1000)
    beta_start, beta_end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if not isinstance(num_steps, int) or num_steps < 2:
        raise InkwashError(f"{where}: scheduler field num_train_timesteps={num_steps!r} must be an integer >= 2")
    for field, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
            raise InkwashError(f"{where}: scheduler field {field}={value!r} must be a number in [0, 1)")
    schedule = NoiseSchedule(
        ScheduleConfig(
            beta_schedule=BETA_SCHEDULES[beta_schedule],
            num_steps=num_steps,
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
    )
    return schedule, PREDICTIONS[prediction_type]


def sampling_from_config(config: dict, where: str) -> dict:
    """The scheduler's sampling settings that a folder records: ``timestep_spacing``, ``steps_offset``,
    ``set_alpha_to_one``, ``clip_sample`` and ``clip_sample_range`` (diffusers' DDPMScheduler defaults where
    absent), with the ``schedule`` and ``clip_denoised`` defaults they give."""
    spacing = _choice(config, "timestep_spacing", "leading", SPACINGS, where)
    offset = config.get("steps_offset", 0)
    if not isinstance(offset, int) or offset < 0:
        raise InkwashError(f"{where}: scheduler field steps_offset={offset!r} must be an integer >= 0")
    clip, clip_range = config.get("clip_sample", True), config.get("clip_sample_range", 1.0)
    alpha_to_one = config.get("set_alpha_to_one", True)
    if not isinstance(alpha_to_one, bool):
        raise InkwashError(f"{where}: scheduler field set_alpha_to_one={alpha_to_one!r} must be true or false")
    if not isinstance(clip, bool):
        raise InkwashError(f"{where}: scheduler field clip_sample={clip!r} must be true or false")
    if not isinstance(clip_range, (int, float)) or not math.isfinite(clip_range) or clip_range <= 0:
        raise InkwashError(f"{where}: scheduler field clip_sample_range={clip_range!r} must be a positive number")
    return {
        "timestep_spacing": spacing,
        "steps_offset": offset,
        "set_alpha_to_one": alpha_to_one,
        "clip_sample": clip,
        "clip_sample_range": float(clip_range),
        "schedule": SPACINGS[spacing],
        "clip_denoised": clip and clip_range == 1,
    }


class DiffusersUNet(nn.Module):
    """A ``diffusers.UNet2DModel`` as an inkwash network ``network(x_vp, t, cond) -> output``; ``t`` is the
    (possibly fractional) float timestep, which its sinusoidal timestep embedding takes as it is."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError("a diffusers UNet2DModel from a DDPM / DDIM pipeline is unconditional")
        return self.unet(x, t).sample


def _check_unet(config: dict, where: str) -> int:
    """The square image size of a UNet2DModel config; an InkwashError for what inkwash cannot run."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise InkwashError(f"{where}: unet is a {config['_class_name']}; only UNet2DModel is supported")
    embedding = config.get("time_embedding_type", "positional")
    if embedding != "positional":
        raise InkwashError(
            f"{where}: unet field time_embedding_type={embedding!r} is not supported (only 'positional')"
        )
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise InkwashError(f"{where}: class-conditional UNet2DModel folders are not supported yet")
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if out_channels != in_channels:
        raise InkwashError(
            f"{where}: unet has {out_channels} output channels for {in_channels} input channels"
            " (a learned variance is not supported)"
        )
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise InkwashError(f"{where}: unet field sample_size={size!r} is not supported (only square images)")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise InkwashError(f"{where}: unet field sample_size={size!r} must be a positive integer")
    return size


def load_diffusers_pipeline(path: str | Path, device: torch.device | str = "cpu") -> Pipeline:
    """A ``Pipeline`` for a ``DDPMPipeline`` / ``DDIMPipeline`` folder (safetensors weights only), with the
    scheduler's sampling defaults (see the module docstring)."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise InkwashError(f"{path}: not a diffusers pipeline folder (no {INDEX_FILE})")
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE, INDEX_FILE)
        kind = index.get("_class_name")
        if kind not in SUPPORTED_PIPELINES:
            raise InkwashError(f"{path}: {kind} folders are not supported yet (only {' / '.join(SUPPORTED_PIPELINES)})")
        for component in ("unet", "scheduler"):
            if not (path / component).is_dir():
                raise InkwashError(f"{path}: missing the {component}/ folder")
        unet_dir, scheduler_file = path / "unet", path / "scheduler" / "scheduler_config.json"
    else:
        kind, unet_dir, scheduler_file = "UNet2DModel", path, bare_scheduler_config(path)
    unet_config = read_json(unet_dir / "config.json", "the unet config")
    scheduler_config = read_json(scheduler_file, "the scheduler config")
    if not (unet_dir / WEIGHTS_FILE).is_file():
        if any(unet_dir.glob("*.bin")):
            raise InkwashError(f"{unet_dir} has only pickled .bin weights; convert them to safetensors")
        raise InkwashError(f"{path}: missing the unet weights ({unet_dir.relative_to(path) / WEIGHTS_FILE})")
    size = _check_unet(unet_config, str(path))
    schedule, prediction = schedule_from_config(scheduler_config, str(path))
    sampling = sampling_from_config(scheduler_config, str(path))
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise InkwashError(
            "loading a diffusers pipeline folder needs the diffusers package (pip install diffusers)"
        ) from None
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InkwashError(f"cannot load {unet_dir}: {str(exc).splitlines()[0]}") from None
    channels = int(unet_config.get("in_channels", 3))
    config = {
        "format": "diffusers",
        "pipeline": kind,
        "prediction": prediction,
        "schedule": schedule.config.to_dict(),
        "sampling": sampling,
        "unet": {"num_classes": 0},
        "data": {"shape": [channels, size, size], "class_names": []},
    }
    from inkwash.pipeline import Pipeline  # here: inkwash.pipeline imports this module

    return Pipeline(DiffusersUNet(unet.float()), schedule, config, device=device, checkpoint=path, use_ema=False)
