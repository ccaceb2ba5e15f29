"""The sampling pipeline: a loaded checkpoint that turns sampling options into images in memory.

``inkwash.load(path)`` returns a ``Pipeline``; ``pipe.generate(...)`` takes the fields of
``inkwash.sampling.options.SampleOptions`` as keyword arguments and returns uint8 pixels. ``inkwash
sample`` runs the same two steps (``prepare``, then ``run``) and only adds the files, so both give the
same pixels for the same settings.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from inkwash.checkpoint import load_model, resolve_checkpoint
from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.precision import resolve_precision
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.core.unet import UNet
from inkwash.data.loading import load_folder, prepare_image, to_uint8, to_unit_range
from inkwash.errors import InkwashError
from inkwash.interop.diffusers_folder import is_diffusers_folder, is_stable_diffusion_folder, load_diffusers_pipeline
from inkwash.sampling.generate import SampleResult, generate
from inkwash.sampling.img2img import strength_sigmas
from inkwash.sampling.options import DEFAULT_PER_CLASS, DEFAULT_STEPS, SampleOptions, inference_device, sampler_options
from inkwash.sampling.samplers import SamplerInfo, get_sampler

# An init image or mask: a file (an init image may also be a folder of images), a PIL image, or a uint8
# array (H, W), (H, W, C) or, for init images only, (N, H, W, C) as ``Pipeline.generate`` returns.
ImageInput = str | os.PathLike | Image.Image | np.ndarray

# Fields of ``SampleOptions`` chosen once, when the checkpoint is loaded, and not per call of ``generate``.
LOAD_OPTIONS = {
    "checkpoint": "inkwash.load(path)",
    "use_ema": "inkwash.load(path, use_ema=...)",
    "device": "inkwash.load(path, device=...)",
}


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
    guidance_scale = 1.0 if options.guidance_scale is None else options.guidance_scale
    for flag, value in (("--prompt", options.prompt), ("--negative-prompt", options.negative_prompt)):
        if value is not None:
            raise InkwashError(f"{flag} needs a text-conditional model (a Stable Diffusion pipeline folder)")
    if options.per_class is not None and not options.grid_by_class:
        raise InkwashError("--per-class needs --grid-by-class")
    if not names:
        for flag, used in (
            ("--class", options.class_label is not None),
            ("--negative-class", options.negative_class is not None),
            ("--grid-by-class", options.grid_by_class),
            ("--guidance-scale", guidance_scale != 1.0),
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
        if options.negative_class is not None:  # steer the unconditional model away from a class
            return torch.tensor([len(names)]), options.num_images
        if guidance_scale != 1.0:
            raise InkwashError("--guidance-scale needs --class, --negative-class or --grid-by-class")
        return None, options.num_images
    if options.class_label == "all":
        return torch.arange(options.num_images) % len(names), options.num_images
    return torch.tensor([resolve_class(options.class_label, names)]), options.num_images


def open_image(path: Path, what: str) -> Image.Image:
    """The image at ``path``, loaded and turned upright by its EXIF orientation."""
    if not path.is_file():
        raise InkwashError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InkwashError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None


def image_from_array(array: np.ndarray, what: str) -> Image.Image:
    """A PIL image from a uint8 (H, W) or (H, W, C) array; a boolean mask becomes 0 / 255."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise InkwashError(f"the {what} must be uint8 (H, W) or (H, W, 1|3|4), got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def as_image(source: ImageInput, what: str) -> Image.Image:
    """A PIL image from a file path, a PIL image or a uint8 array."""
    if isinstance(source, np.ndarray):
        return image_from_array(source, what)
    if isinstance(source, Image.Image):
        return source
    return open_image(Path(source), what)


def read_init(source: ImageInput, channels: int, size: int, show: bool) -> tuple[torch.Tensor, tuple | None]:
    """The init image(s) as (N, C, H, W) in [-1, 1], and the (width, height) of a single one (None for a
    folder or a batch, whose images are each cropped to the model's square, and the mask with them)."""
    if isinstance(source, np.ndarray) and source.ndim == 4:
        images = [image_from_array(image, "init image") for image in source]
        return to_unit_range(np.stack([prepare_image(image, channels, size) for image in images])), None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return load_folder(Path(source), channels, size, show_progress=show, cache=False).images, None
    image = as_image(source, "init image")
    return to_unit_range(prepare_image(image, channels, size)[None]), image.size


def read_mask(source: ImageInput, size: int, init_size: tuple | None, show: bool) -> torch.Tensor:
    """The mask (white or True = generate, black = keep) as (1, 1, size, size) in {0, 1}. A mask of
    another size than a single init image is first resized to that image's size, as the WebUI does, so
    that both are cropped to the same region."""
    image = as_image(source, "mask")
    if init_size is not None and image.size != init_size:
        if show:
            width, height = init_size
            print(f"note: the {image.width}x{image.height} mask was resized to the init image's {width}x{height}")
        image = image.convert("L").resize(init_size, Image.BILINEAR)
    pixels = prepare_image(image, 1, size)  # (H, W, 1)
    return torch.from_numpy((pixels[..., 0] > 127).astype(np.float32))[None, None]


def check_request(options: SampleOptions) -> SamplerInfo:
    """The checks that need no model (every option's type, choices and limits, ``SampleOptions.validate``),
    so that a command can make them before loading one; the sampler they name."""
    options.validate()
    return get_sampler(options.sampler)


@dataclass
class SampleJob:
    """A checked sampling request with its inputs loaded: everything ``Pipeline.run`` needs."""

    options: SampleOptions
    sampler: SamplerInfo
    schedule: str  # the step schedule's name
    steps: int  # the schedule's steps; img2img runs the last ``len(sigmas) - 1`` of them
    sigmas: torch.Tensor  # (steps_run + 1,) descending, ends in 0
    sampler_options: dict  # the sampler's own settings that were given (eta, variance, s_churn)
    labels: torch.Tensor | None  # (N,) or (1,) class indices; None: unconditional
    num_images: int
    init: torch.Tensor | None  # (N or 1, C, H, W) in [-1, 1]
    mask: torch.Tensor | None  # (1, 1, H, W), 1 = generate
    guidance_label: int | torch.Tensor | None = (
        None  # what guidance steers away from: the null label or a negative class
    )
    guidance_scale: float = 1.0

    @property
    def steps_run(self) -> int:
        return len(self.sigmas) - 1


class Pipeline:
    """A network, its noise schedule and its config, ready to sample from.

    Public attributes: ``denoiser`` (the ``D(x, sigma, cond=None) -> x0_hat`` contract that every sampler
    calls), ``schedule`` (the ``NoiseSchedule``), ``config`` (the checkpoint's config.json), ``class_names``
    (empty for an unconditional model), ``model`` (the ``UNet``), ``device`` and ``image_shape`` (C, H, W).
    ``text_conditional`` is True for a model that takes a text prompt (``inkwash.interop.stable_diffusion``).
    """

    text_conditional = False

    def __init__(
        self,
        model: UNet,
        schedule: NoiseSchedule,
        config: dict,
        *,
        device: torch.device | str = "cpu",
        checkpoint: Path | None = None,
        use_ema: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.schedule = schedule
        self.config = config
        self.denoiser = ModelDenoiser(self.model, schedule, config.get("prediction", "eps"))
        self.class_names = class_names(config)
        self.image_shape = tuple(config["data"]["shape"])
        self.checkpoint = checkpoint
        self.use_ema = use_ema
        self._compiled: ModelDenoiser | None = None

    def compiled_denoiser(self) -> ModelDenoiser:
        """The denoiser with its network under ``torch.compile`` (compiled on first use, then kept). On a CPU
        the compiled network is a channels_last copy: 1.25x the speed of the plain compiled one for bf16 DDIM
        on the AMX Xeon (inductor's weight freezing on top of it measured slower)."""
        if self._compiled is None:
            network: torch.nn.Module = self.model
            if self.device.type == "cpu":
                network = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            self._compiled = ModelDenoiser(torch.compile(network), self.schedule, self.config.get("prediction", "eps"))
        return self._compiled

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        use_ema: bool = True,
        device: str | torch.device = "auto",
        precision: str = "fp32",
    ) -> Pipeline:
        """Load a run folder (its newest complete checkpoint) or one checkpoint folder. ``use_ema`` picks
        the EMA weights (the default) or the raw ones; ``device`` is auto, cpu, cuda or a torch.device. A
        diffusers ``DDPMPipeline`` / ``DDIMPipeline`` folder and a ``StableDiffusionPipeline`` folder are loaded
        too (``use_ema`` does not apply). ``precision`` is the dtype a Stable Diffusion folder's weights are held
        in: fp32, or fp16 / bf16 to halve their memory, or auto (what ``--precision auto`` picks on the device: bf16
        on a CPU with bf16 instructions, else fp32); an inkwash checkpoint keeps fp32 weights, and each call's
        ``precision`` autocasts."""
        placed = device if isinstance(device, torch.device) else inference_device(device, "fp32")
        if is_stable_diffusion_folder(path):
            from inkwash.interop.stable_diffusion_folder import load_stable_diffusion

            return load_stable_diffusion(path, placed, resolve_precision(precision, placed))
        if is_diffusers_folder(path):
            return load_diffusers_pipeline(path, placed)
        checkpoint = resolve_checkpoint(path)
        model, schedule, config = load_model(checkpoint, use_ema=use_ema)
        return cls(model, schedule, config, device=placed, checkpoint=checkpoint, use_ema=use_ema)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the sampler's space: the identity here; a latent model decodes with its VAE.
        The web UI's live preview shows ``decode(denoised)``."""
        return x

    def decode_trajectory(self, trajectory: list) -> list:
        """``SampleResult.trajectory`` in pixels, for the reverse strip: as it is here; decoded by a latent model."""
        return trajectory

    def __repr__(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"Pipeline({self.checkpoint}, image {self.image_shape}{classes}, on {self.device})"

    def prepare(
        self,
        options: SampleOptions,
        *,
        init_image: ImageInput | None = None,
        mask: ImageInput | None = None,
    ) -> SampleJob:
        """Check ``options`` against this model and load the init image and mask; nothing is sampled yet.
        ``init_image`` and ``mask`` default to ``options.init_image`` and ``options.mask``."""
        info = check_request(options)
        given = sampler_options(info.id, eta=options.eta, variance=options.variance, s_churn=options.s_churn)
        labels, num_images = plan_labels(options, self.class_names)
        _, height, width = self.image_shape
        for flag, value, size in (("--width", options.width, width), ("--height", options.height, height)):
            if value is not None and value != size:
                raise InkwashError(f"{flag} {value} is not this model's size ({width}x{height}); only its own size")
        guidance_label = len(self.class_names) or None
        if options.negative_class is not None:
            guidance_label = resolve_class(options.negative_class, self.class_names)
        steps, schedule_name, sigmas = self.step_schedule(options, info)
        init_image = options.init_image if init_image is None else init_image
        mask = options.mask if mask is None else mask
        init = mask_tensor = None
        if init_image is None and mask is not None:
            raise InkwashError("--mask needs --init-image")
        if init_image is not None:
            channels, size = self.image_shape[0], self.image_shape[1]
            init, init_size = read_init(init_image, channels, size, options.show_progress)
            if mask is not None:
                mask_tensor = read_mask(mask, size, init_size, options.show_progress)
            sigmas = strength_sigmas(sigmas, options.strength)
        scale = 1.0 if options.guidance_scale is None else options.guidance_scale
        return SampleJob(
            options,
            info,
            schedule_name,
            steps,
            sigmas,
            given,
            labels,
            num_images,
            init,
            mask_tensor,
            guidance_label,
            scale,
        )

    def step_schedule(self, options: SampleOptions, info: SamplerInfo) -> tuple[int, str, torch.Tensor]:
        """The steps, the step schedule's name and its sigmas. A checkpoint's own sampling defaults come before the
        sampler's (a diffusers folder's ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``: see
        ``inkwash.interop.diffusers_folder``)."""
        steps = options.steps or DEFAULT_STEPS.get(info.id, 50)
        if steps > self.schedule.num_steps:
            raise InkwashError(f"--steps must be at most {self.schedule.num_steps}, got {steps}")
        sampling = self.config.get("sampling", {})
        schedule_name = options.schedule or sampling.get("schedule") or info.default_schedule
        offset = int(sampling.get("steps_offset", 0)) if schedule_name == "leading" else 0
        try:
            sigmas = build_sigmas(self.schedule, steps, schedule_name, rho=options.rho, offset=offset)
        except ValueError as exc:
            raise InkwashError(str(exc)) from None
        # diffusers' DDIM and PNDM with set_alpha_to_one false step last to alpha_bar[0], not to alpha_bar = 1.
        sigma_min = self.schedule.sigmas[0]
        if info.id in ("ddim", "plms") and not sampling.get("set_alpha_to_one", True) and sigmas[-2] > sigma_min:
            sigmas = torch.cat([sigmas[:-1], sigma_min.reshape(1).to(sigmas.dtype)])
        return steps, schedule_name, sigmas

    def run(
        self,
        job: SampleJob,
        *,
        on_batch: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
    ) -> SampleResult:
        """Sample ``job``: images (N, C, H, W) in [-1, 1], model evaluations per image and the reverse
        trajectory of ``strip_points`` steps of the first batch. ``on_batch(start, images)`` sees each
        batch as it is done; ``on_step(state)`` each step, and may stop the run by raising
        ``inkwash.sampling.generate.SamplingInterrupted``."""
        inference_device(self.device.type, job.options.precision)  # warns when the precision is slow here
        return self.sample_job(job, self.image_shape, on_batch=on_batch, on_step=on_step)

    def sample_job(
        self,
        job: SampleJob,
        shape: tuple,
        *,
        on_batch: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
        **overrides: Any,
    ) -> SampleResult:
        """``generate`` with ``job``'s settings on images (or latents) of ``shape``, recording ``strip_points``
        steps of the first batch; ``overrides`` replace generate's arguments (a latent model's clipping,
        output range and precision)."""
        options = job.options
        points = options.strip_points
        record = sorted({round(i * (job.steps_run - 1) / max(1, points - 1)) for i in range(points)})
        arguments = {
            "sampler": job.sampler.id,
            "num_images": job.num_images,
            "batch_size": options.batch_size,
            "seed": options.seed,
            "sampler_options": job.sampler_options,
            "record": record,
            "show_progress": options.show_progress,
            "on_batch": on_batch,
            "init": job.init,
            "mask": job.mask,
            "labels": job.labels,
            "guidance_scale": job.guidance_scale,
            "null_label": job.guidance_label,
            "clip_denoised": options.clip_denoised,
            "device": self.device,
            "precision": options.precision,
            "subseed": options.subseed,
            "subseed_strength": options.subseed_strength,
            "on_step": on_step,
        }
        denoiser = self.compiled_denoiser() if options.compile else self.denoiser
        return generate(denoiser, shape, job.sigmas, **{**arguments, **overrides})

    def sample_options(self, **given: Any) -> SampleOptions:
        """``SampleOptions`` for this pipeline from keyword arguments (the defaults are the dataclass's, and a
        checkpoint's own ``config["sampling"]["clip_denoised"]``: a diffusers folder's ``clip_sample``)."""
        names = {field.name for field in fields(SampleOptions)} - {"out"}  # generate writes no files
        for name in given:
            if name in LOAD_OPTIONS:
                raise TypeError(f"{name} is chosen when loading: {LOAD_OPTIONS[name]}")
            if name not in names:
                raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
        if "clip_denoised" in self.config.get("sampling", {}):
            given.setdefault("clip_denoised", self.config["sampling"]["clip_denoised"])
        return SampleOptions(
            checkpoint=str(self.checkpoint), out="", use_ema=self.use_ema, device=self.device.type, **given
        )

    def generate(self, **options: Any) -> np.ndarray:
        """Sample images and return them as uint8 (N, H, W, C), the pixels ``inkwash sample`` writes.

        Takes the fields of ``SampleOptions`` as keyword arguments, with its defaults: ``sampler`` (an id
        such as ``dpmpp_2m`` or a WebUI name such as ``"DPM++ 2M"``), ``steps``, ``schedule``, ``eta``,
        ``variance``, ``s_churn``, ``rho``, ``num_images``, ``batch_size``, ``seed`` (image i uses seed
        ``seed + i``), ``clip_denoised``, ``class_label`` (a class name, an index such as ``"3"`` or ``"all"``),
        ``negative_class`` (guidance steers away from it), ``guidance_scale``, ``subseed`` with ``subseed_strength``
        (variation seeds), ``grid_by_class`` with ``per_class``, ``init_image`` with ``strength``
        (img2img), ``mask`` (inpainting), ``strip_points``, ``precision`` and ``show_progress``.
        ``init_image`` is a file, a folder, a PIL image or a uint8 array (H, W[, C]) or (N, H, W, C);
        ``mask`` is a file, a PIL image or an array (H, W), white (or True) where pixels are generated.
        ``use_ema`` and ``device`` are chosen by ``inkwash.load``.
        """
        init_image, mask = options.pop("init_image", None), options.pop("mask", None)
        job = self.prepare(self.sample_options(**options), init_image=init_image, mask=mask)
        return to_uint8(self.run(job).images)
