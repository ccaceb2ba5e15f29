"""Stable Diffusion pipeline folders (``StableDiffusionPipeline.save_pretrained``) as inkwash pipelines: every
inkwash sampler and step schedule in latent space, text prompts with a negative prompt, per-sample seeds,
img2img and inpainting. The folder is read by ``stable_diffusion_folder``.

The folder's ``unet/`` (``UNet2DConditionModel``) becomes the network behind inkwash's denoiser contract, its
``cond`` the prompt's CLIP embeddings (``text.PromptEncoder``; the WebUI's emphasis syntax and prompts longer
than 75 tokens in chunks of 77 positions unless ``emphasis`` is off); classifier-free guidance uses the negative
prompt's embedding where the empty prompt's would be. The sampler runs on latents scaled by the VAE's
``scaling_factor``; each finished batch is decoded by ``vae/`` (``AutoencoderKL``). img2img encodes the init
image with the VAE (the mean of its latent distribution: deterministic, where diffusers samples it);
inpainting masks in latent space (a latent is regenerated where any of its 8x8 pixels is) and, after
decoding, puts every kept pixel back exactly. Weights are read from safetensors only.
"""

from __future__ import annotations

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
from inkwash.interop.text import PromptEncoder
from inkwash.pipeline import ImageInput, Pipeline, SampleJob, as_image, check_request, image_from_array
from inkwash.sampling.generate import SampleResult, cycle_rows
from inkwash.sampling.img2img import strength_sigmas
from inkwash.sampling.options import SampleOptions, inference_device, sampler_options
from inkwash.sampling.samplers import SamplerInfo

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


class StableDiffusion(Pipeline):
    """A Stable Diffusion folder, ready to sample: ``generate(prompt=..., negative_prompt=..., width=...,
    height=..., ...)`` with every ``SampleOptions`` field that is not about classes (``emphasis=False`` reads
    prompts as diffusers does). Also ``vae``,
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
            return [image_from_array(image, "init image") for image in source]
        if not isinstance(source, (np.ndarray, Image.Image)) and Path(source).is_dir():
            raise InkwashError(
                "a Stable Diffusion folder takes one init image (a file, PIL image or array), not a folder"
            )
        return [as_image(source, "init image")]

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
                gray = as_image(mask, "mask").convert("L").resize((width, height), Image.BILINEAR)
                pixel_mask = torch.from_numpy((np.asarray(gray) > 127).astype(np.float32))[None, None]
                latent_mask = F.max_pool2d(pixel_mask, self.downsample)  # (1, 1, h, w)
            sigmas = strength_sigmas(sigmas, options.strength)
        emphasis = options.emphasis
        cond = self.prompts.encode([options.prompt or ""], warn=options.show_progress, emphasis=emphasis)  # (1, L, D)
        null = self.prompts.encode([options.negative_prompt or ""], emphasis=emphasis)
        if emphasis:  # guidance batches both: the shorter gets the empty prompt's chunks
            length = max(cond.shape[1], null.shape[1])
            cond, null = self.prompts.pad_chunks(cond, length), self.prompts.pad_chunks(null, length)
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
                kept = cycle_rows(job.init_pixels, start, pixels.shape[0])
                pixels = job.pixel_mask * pixels + (1 - job.pixel_mask) * kept
            decoded.append(pixels)
            if on_batch is not None:
                on_batch(start, pixels)

        shape = (self.latent_channels, job.height // self.downsample, job.width // self.downsample)
        result = self.sample_job(
            job,
            shape,
            on_batch=decode_batch,
            on_step=on_step,
            clip_denoised=False,
            output_range=None,
            precision=precision,
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
