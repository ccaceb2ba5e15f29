"""Stable Diffusion pipeline folders (``StableDiffusionPipeline.save_pretrained``) as inkwash pipelines: every
inkwash sampler and step schedule in latent space, text prompts with a negative prompt, per-sample seeds,
img2img and inpainting.

The folder's ``unet/`` (``UNet2DConditionModel``) becomes the network behind inkwash's denoiser contract, its
``cond`` the prompt's CLIP embeddings (``text.PromptEncoder``); classifier-free guidance uses the negative
prompt's embedding where the empty prompt's would be. The sampler runs on latents scaled by the VAE's
``scaling_factor``; each finished batch is decoded by ``vae/`` (``AutoencoderKL``). img2img encodes the init
image with the VAE (the mean of its latent distribution: deterministic, where diffusers samples it);
inpainting masks in latent space (a latent is regenerated where any of its 8x8 pixels is) and, after
decoding, puts every kept pixel back exactly. Weights are read from safetensors only.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from inkwash.core.precision import precision_context, resolve_precision
from inkwash.data.loading import to_unit_range
from inkwash.errors import InkwashError
from inkwash.interop.diffusers_folder import INDEX_FILE, _read_json, sampling_from_config, schedule_from_config
from inkwash.interop.text import PromptEncoder
from inkwash.pipeline import ImageInput, Pipeline, SampleJob, _as_image, _from_array, check_request
from inkwash.sampling.generate import SampleResult, _rows, generate
from inkwash.sampling.img2img import strength_sigmas
from inkwash.sampling.options import SampleOptions, inference_device, sampler_options
from inkwash.sampling.samplers import SamplerInfo

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", None),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default


class ConditionalUNet(nn.Module):
    """A ``UNet2DConditionModel`` as an inkwash network ``network(x_vp, t, cond)``: ``cond`` is the (B, L, D)
    prompt embeddings it attends to, and ``t`` the (possibly fractional) timestep."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a Stable Diffusion UNet needs prompt embeddings as cond")
        return self.unet(x, t, encoder_hidden_states=cond.to(x.dtype)).sample


@dataclass
class LatentJob(SampleJob):
    """A ``SampleJob`` in latent space: ``labels`` holds the prompt's embeddings, ``guidance_label`` the negative
    prompt's, ``init`` and ``mask`` are latents; the pixels of the init image and mask come along for the end."""

    width: int = 0
    height: int = 0
    init_pixels: torch.Tensor | None = None  # (N or 1, 3, H, W) in [-1, 1]
    pixel_mask: torch.Tensor | None = None  # (1, 1, H, W), 1 = generate


def _weights_variant(folder: Path, stem: str, root: Path) -> str | None:
    """The weights variant to load ("fp16" for ``stem.fp16.safetensors``; None for ``stem.safetensors``, sharded
    or not); a one-line error for pickled-only or missing weights."""
    for variant in (None, "fp16"):
        name = stem if variant is None else f"{stem}.{variant}"
        if (folder / f"{name}.safetensors").is_file() or (folder / f"{name}.safetensors.index.json").is_file():
            return variant
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise InkwashError(f"{folder} has only pickled .bin weights; convert them to safetensors")
    raise InkwashError(f"{root}: missing the {folder.name} weights ({folder.name}/{stem}.safetensors)")


def _check_index(path: Path, index: dict) -> None:
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise InkwashError(f"{path}: {kind} folders are not supported yet (only {' / '.join(SUPPORTED_PIPELINES)})")
    for name, (_, cls) in COMPONENTS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise InkwashError(f"{path}: {INDEX_FILE} names no {name} component")
        if not (path / name).is_dir():
            raise InkwashError(f"{path}: missing the {name}/ folder")
        if cls is not None and entry[1] not in (cls, cls + "Fast"):
            raise InkwashError(f"{path}: {name} is a {entry[1]}; only {cls} is supported")


def _check_unet(unet: dict, vae: dict, text: dict, where: str) -> None:
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent:
        raise InkwashError(
            f"{where}: the unet takes {unet.get('in_channels')} input channels, not the VAE's {latent} latent channels"
            " (inpainting UNets with 9 input channels are not supported)"
        )
    if unet.get("out_channels") != latent:
        raise InkwashError(f"{where}: the unet has {unet.get('out_channels')} output channels for {latent} latents")
    for field in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim"):
        if unet.get(field) is not None:
            raise InkwashError(f"{where}: unet field {field}={unet[field]!r} is not supported (SDXL and variants)")
    width = unet.get("cross_attention_dim")
    if isinstance(width, int) and width != text.get("hidden_size"):
        given = text.get("hidden_size")
        raise InkwashError(f"{where}: the unet attends to {width}-wide text embeddings, the text encoder gives {given}")
    for field in ("latents_mean", "latents_std"):
        if vae.get(field) is not None:
            raise InkwashError(f"{where}: vae field {field} is not supported (SDXL-style latent normalization)")


def _quiet_loading() -> None:
    """No progress bars or advice from diffusers and transformers while loading: inkwash shows its own."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(cls, folder: Path, stem: str, root: Path, dtype: torch.dtype):
    variant = _weights_variant(folder, stem, root)
    # accelerate (where installed) lets the weights load without first initializing a random model
    low_memory = importlib.util.find_spec("accelerate") is not None
    try:
        return cls.from_pretrained(
            folder, use_safetensors=True, torch_dtype=dtype, variant=variant, low_cpu_mem_usage=low_memory
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise InkwashError(f"cannot load {folder} (do its config and weights match?): {message}") from None


def load_stable_diffusion(
    path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32"
) -> StableDiffusion:
    """A ``StableDiffusion`` pipeline for a Stable Diffusion folder; ``precision`` (fp32, fp16, bf16) is the dtype
    its weights are held in."""
    path = Path(path)
    if precision not in DTYPES:
        raise InkwashError(f"precision must be one of {', '.join(DTYPES)} for a Stable Diffusion folder's weights")
    index = _read_json(path / INDEX_FILE, INDEX_FILE)
    _check_index(path, index)
    unet_config = _read_json(path / "unet" / "config.json", "the unet config")
    vae_config = _read_json(path / "vae" / "config.json", "the vae config")
    text_config = _read_json(path / "text_encoder" / "config.json", "the text encoder config")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
    _check_unet(unet_config, vae_config, text_config, str(path))
    schedule, prediction = schedule_from_config(scheduler_config, str(path))
    sampling = sampling_from_config(scheduler_config, str(path))
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise InkwashError(
            "loading a Stable Diffusion folder needs diffusers and transformers (pip install 'inkwash[diffusers]')"
        ) from None
    _quiet_loading()
    dtype = DTYPES[precision]
    unet = _load(UNet2DConditionModel, path / "unet", "diffusion_pytorch_model", path, dtype)
    vae = _load(AutoencoderKL, path / "vae", "diffusion_pytorch_model", path, dtype)
    text_encoder = _load(CLIPTextModel, path / "text_encoder", "model", path, dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    except (OSError, ValueError, TypeError) as exc:
        raise InkwashError(f"cannot load {path / 'tokenizer'}: {str(exc).splitlines()[0]}") from None
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    config = {
        "format": "diffusers",
        "pipeline": index["_class_name"],
        "prediction": prediction,
        "schedule": schedule.config.to_dict(),
        "sampling": {**sampling, "clip_denoised": False},  # latents are not in [-1, 1]
        "unet": {"num_classes": 0},
        "data": {"shape": [3, height * downsample, width * downsample], "class_names": []},
        "latent": {
            "channels": int(vae.config.latent_channels),
            "downsample": downsample,
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        },
        "weights_precision": precision,
    }
    return StableDiffusion(
        unet, vae, PromptEncoder(tokenizer, text_encoder), schedule, config, device=device, checkpoint=path
    )


class StableDiffusion(Pipeline):
    """A Stable Diffusion folder, ready to sample: ``generate(prompt=..., negative_prompt=..., width=...,
    height=..., ...)`` with every ``SampleOptions`` field that is not about classes. Also ``vae``,
    ``prompts`` (the ``PromptEncoder``), ``encode(pixels)`` and ``decode(latents)``."""

    text_conditional = True

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompts: PromptEncoder,
        schedule,
        config: dict,
        *,
        device,
        checkpoint: Path,
    ) -> None:
        super().__init__(ConditionalUNet(unet), schedule, config, device=device, checkpoint=checkpoint, use_ema=False)
        self.vae = vae.to(self.device).eval()
        prompts.text_encoder.to(self.device)
        self.prompts = prompts
        latent = config["latent"]
        self.latent_channels, self.downsample = latent["channels"], latent["downsample"]
        self.scaling_factor, self.shift_factor = latent["scaling_factor"], latent["shift_factor"]
        self.decode_precision = "auto"

    def __repr__(self) -> str:
        _, height, width = self.image_shape
        return f"StableDiffusion({self.checkpoint}, {width}x{height} by default, on {self.device})"

    # ---- the VAE ---------------------------------------------------------------------------------------------

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, pixels: torch.Tensor, precision: str = "auto") -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, C, H/8, W/8) scaled latents (the mean of the VAE's posterior)."""
        placed = resolve_precision(precision, self.device)
        with torch.no_grad(), precision_context(placed, self.device):
            mean = self.vae.encode(pixels.to(self.device, self._vae_dtype())).latent_dist.mean
        return ((mean.float() - self.shift_factor) * self.scaling_factor).cpu()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] on the CPU; one image at a time on a CPU
        (a 512x512 decode holds about 1 GB of activations), the whole batch on a GPU."""
        placed = resolve_precision(self.decode_precision, self.device)
        chunk = x.shape[0] if self.device.type == "cuda" else 1
        out = []
        for start in range(0, x.shape[0], chunk):
            latents = x[start : start + chunk].float() / self.scaling_factor + self.shift_factor
            with torch.no_grad(), precision_context(placed, self.device):
                pixels = self.vae.decode(latents.to(self.device, self._vae_dtype())).sample
            out.append(pixels.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    # ---- requests --------------------------------------------------------------------------------------------

    def _size(self, options: SampleOptions, init: list[Image.Image] | None) -> tuple[int, int]:
        """(width, height): given, else the init image's rounded down to the VAE's multiple, else the model's."""
        _, default_height, default_width = self.image_shape
        if init:
            default_width = max(self.downsample, init[0].width // self.downsample * self.downsample)
            default_height = max(self.downsample, init[0].height // self.downsample * self.downsample)
        width = options.width or default_width
        height = options.height or default_height
        for flag, value in (("--width", width), ("--height", height)):
            if value % self.downsample or value < self.downsample:
                raise InkwashError(f"{flag} must be a positive multiple of {self.downsample}, got {value}")
        return width, height

    def _init_images(self, source: ImageInput) -> list[Image.Image]:
        if isinstance(source, np.ndarray) and source.ndim == 4:
            return [_from_array(image, "init image") for image in source]
        if not isinstance(source, (np.ndarray, Image.Image)) and Path(source).is_dir():
            raise InkwashError(
                "a Stable Diffusion folder takes one init image (a file, PIL image or array), not a folder"
            )
        return [_as_image(source, "init image")]

    def prepare(
        self, options: SampleOptions, *, init_image: ImageInput | None = None, mask: ImageInput | None = None
    ) -> LatentJob:
        """Check ``options`` against this model, encode the prompts and the init image; nothing is sampled yet."""
        info: SamplerInfo = check_request(options)
        given = sampler_options(info.id, eta=options.eta, variance=options.variance, s_churn=options.s_churn)
        for flag, used in (
            ("--class", options.class_label is not None),
            ("--negative-class", options.negative_class is not None),
            ("--grid-by-class", options.grid_by_class),
            ("--per-class", options.per_class is not None),
        ):
            if used:
                raise InkwashError(f"{flag} is for class-conditional models; a Stable Diffusion folder takes --prompt")
        steps, schedule_name, sigmas = self.step_schedule(options, info)
        init_image = options.init_image if init_image is None else init_image
        mask = options.mask if mask is None else mask
        if init_image is None and mask is not None:
            raise InkwashError("--mask needs --init-image")
        images = self._init_images(init_image) if init_image is not None else None
        width, height = self._size(options, images)
        init_pixels = init_latents = pixel_mask = latent_mask = None
        if images:
            resized = [np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC)) for image in images]
            init_pixels = to_unit_range(np.stack(resized))  # (N, 3, H, W)
            init_latents = self.encode(init_pixels, options.precision)
            if mask is not None:
                gray = _as_image(mask, "mask").convert("L").resize((width, height), Image.BILINEAR)
                pixel_mask = torch.from_numpy((np.asarray(gray) > 127).astype(np.float32))[None, None]
                latent_mask = F.max_pool2d(pixel_mask, self.downsample)  # (1, 1, h, w)
            sigmas = strength_sigmas(sigmas, options.strength)
        cond = self.prompts.encode([options.prompt or ""], warn=options.show_progress)  # (1, L, D)
        null = self.prompts.encode([options.negative_prompt or ""])
        scale = DEFAULT_GUIDANCE if options.guidance_scale is None else options.guidance_scale
        return LatentJob(
            options,
            info,
            schedule_name,
            steps,
            sigmas,
            given,
            cond,
            options.num_images,
            init_latents,
            latent_mask,
            null,
            scale,
            width=width,
            height=height,
            init_pixels=init_pixels,
            pixel_mask=pixel_mask,
        )

    def run(
        self,
        job: SampleJob,
        *,
        on_batch: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
    ) -> SampleResult:
        """Sample ``job``'s latents, decode each batch as it finishes and put the kept pixels back; as
        ``Pipeline.run``, with images (N, 3, H, W) in [-1, 1] and the trajectory in latents
        (``decode_trajectory``)."""
        assert isinstance(job, LatentJob)
        options = job.options
        inference_device(self.device.type, options.precision)
        # Weights loaded in fp16 / bf16 run in their own dtype, as diffusers' torch_dtype pipelines do: autocast
        # would also run every GroupNorm and softmax in fp32 (on an H200, SD 1.5 at 512x512 was 0.79-0.87x
        # diffusers' speed with 1.4x its memory that way).
        precision = "fp32" if self.config.get("weights_precision", "fp32") != "fp32" else options.precision
        self.decode_precision = precision
        decoded: list[torch.Tensor] = []

        def decode_batch(start: int, latents: torch.Tensor) -> None:
            pixels = self.decode(latents)
            if job.pixel_mask is not None:
                kept = _rows(job.init_pixels, start, pixels.shape[0])
                pixels = job.pixel_mask * pixels + (1 - job.pixel_mask) * kept
            decoded.append(pixels)
            if on_batch is not None:
                on_batch(start, pixels)

        points = options.strip_points
        record = sorted({round(i * (job.steps_run - 1) / max(1, points - 1)) for i in range(points)})
        shape = (self.latent_channels, job.height // self.downsample, job.width // self.downsample)
        result = generate(
            self.compiled_denoiser() if options.compile else self.denoiser,
            shape,
            job.sigmas,
            sampler=job.sampler.id,
            num_images=job.num_images,
            batch_size=options.batch_size,
            seed=options.seed,
            sampler_options=job.sampler_options,
            record=record,
            show_progress=options.show_progress,
            on_batch=decode_batch,
            init=job.init,
            mask=job.mask,
            labels=job.labels,
            guidance_scale=job.guidance_scale,
            null_label=job.guidance_label,
            clip_denoised=False,
            output_range=None,
            device=self.device,
            precision=precision,
            subseed=options.subseed,
            subseed_strength=options.subseed_strength,
            on_step=on_step,
        )
        images = torch.cat(decoded) if decoded else torch.empty(0, 3, job.height, job.width)
        return SampleResult(images=images, nfe=result.nfe, trajectory=result.trajectory, interrupted=result.interrupted)

    def decode_trajectory(self, trajectory: list) -> list:
        """The reverse strip's recorded (sigma, x, denoised) in pixels: the first image's, decoded (two VAE decodes
        per recorded step, so only ``inkwash sample`` asks for it)."""
        decoded = []
        for sigma, x, denoised in trajectory:
            vp = math.sqrt(1.0 + sigma**2)
            decoded.append((sigma, self.decode(x[:1] / vp) * vp, self.decode(denoised[:1])))
        return decoded
