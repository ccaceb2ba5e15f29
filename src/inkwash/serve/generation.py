"""txt2img and img2img requests: checked in full before they are queued (``plan_request``), then run on
the worker thread (``run_plan``) through ``inkwash.pipeline.Pipeline``, the same path as ``inkwash sample``,
so the same seed gives the same image here, there and at any batch size (the same noise; pixels
equal to within one level in 255, since convolutions round differently at different batch sizes).

A text-conditional model (a Stable Diffusion folder) takes ``prompt`` and ``negative_prompt`` as text,
``cfg_scale`` as its guidance scale, and any ``width`` and ``height`` in multiples of its VAE's 8 up to
``--max-pixels``; img2img resizes the init image and the mask to that size."""

from __future__ import annotations

import base64
import inspect
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from inkwash.data.loading import SIXTEEN_BIT_MODES, prepare_image, to_uint8
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes
from inkwash.pipeline import Pipeline, resolve_class
from inkwash.sampling.options import DEFAULT_STEPS, SampleOptions
from inkwash.sampling.samplers import SamplerInfo
from inkwash.serve.config import ServeOptions
from inkwash.serve.models import ModelEntry, ModelStore
from inkwash.serve.requests import GenerationRequest, Img2ImgRequest, ignored_fields
from inkwash.serve.webui import (
    VERSION,
    FieldError,
    ScheduleType,
    blur_mask,
    composite,
    decode_image,
    encode_png,
    fill_masked,
    format_infotext,
    mask_channel,
    resolve_sampler,
    resolve_schedule,
)
from inkwash.serve.worker import Progress

# The WebUI's resize modes that inkwash has: 0 "Just resize" and 1 "Crop and resize".
RESIZE_MODES = {0: "resize", 1: "crop"}
# Sampler settings that apply only to the samplers whose function takes them; the others ignore them.
SAMPLER_SETTINGS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
# inkwash's class options, refused by name when a client sends them for a text-conditional model.
CLASS_FIELDS = ("class_label", "negative_class", "grid_by_class", "per_class")


@dataclass
class Plan:
    """A checked request: everything the worker needs, nothing left to fail on the client's input."""

    kind: str  # txt2img or img2img
    model: str
    entry: ModelEntry
    options: SampleOptions
    sampler: SamplerInfo
    schedule: ScheduleType
    settings: dict  # sampler settings that this sampler takes
    seed: int
    subseed: int
    request: GenerationRequest
    ignored: list[str]
    width: int = 0  # the images' size: the model's, or a text-conditional model's requested size
    height: int = 0
    init: np.ndarray | None = None  # (H, W, C) uint8 at the images' size, after inpainting_fill
    original: np.ndarray | None = None  # the init image before the fill, for the final composite
    mask: np.ndarray | None = None  # (H, W) bool, True = generated
    alpha: np.ndarray | None = None  # (H, W) the blurred mask
    extra_info: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.request.batch_size * self.request.n_iter


def _model_name(request: GenerationRequest, store: ModelStore) -> str:
    name = (request.override_settings or {}).get("sd_model_checkpoint")
    if name is None:
        return store.current
    name = store.by_title(name)
    if name not in store.entries:
        raise FieldError(
            "override_settings.sd_model_checkpoint", f"unknown model {name!r}; choose from {', '.join(store.names)}"
        )
    return name


def _check_class(value: str, field_name: str, entry: ModelEntry) -> str | None:
    value = value.strip()
    if not value:
        return None
    if not entry.classes:
        raise FieldError(field_name, f"model {entry.name!r} is unconditional: send an empty {field_name}")
    try:
        resolve_class(value, entry.classes)
    except InkwashError:
        raise FieldError(field_name, f"unknown class {value!r}; choose from {', '.join(entry.classes)}") from None
    return value


def _check_size(request: GenerationRequest, entry: ModelEntry, limits: ServeOptions) -> tuple[int, int]:
    """(width, height) of a text-conditional model's images: the request's, else the model's default size."""
    _channels, default_height, default_width = entry.shape
    width = default_width if request.width is None else request.width
    height = default_height if request.height is None else request.height
    step = entry.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value % step:
            raise FieldError(name, f"must be a positive multiple of {step}, got {value}")
    if width * height > limits.max_pixels:
        name = "width" if request.width is not None else "height"
        raise FieldError(
            name, f"width x height must be at most {limits.max_pixels} pixels (--max-pixels), got {width}x{height}"
        )
    return width, height


def _check_limits(request: GenerationRequest, entry: ModelEntry, limits: ServeOptions) -> None:
    _channels, height, width = entry.shape
    most = min(limits.max_steps, entry.num_steps)
    if request.steps > most:
        raise FieldError("steps", f"must be at most {most}, got {request.steps}")
    if request.batch_size > limits.max_batch_size:
        raise FieldError("batch_size", f"must be at most {limits.max_batch_size}, got {request.batch_size}")
    if request.batch_size * request.n_iter > limits.max_images:
        raise FieldError(
            "n_iter",
            f"batch_size x n_iter must be at most {limits.max_images}, got {request.batch_size * request.n_iter}",
        )
    if entry.text_conditional:
        return
    for name, value, size in (("width", request.width, width), ("height", request.height, height)):
        if value is not None and value != size:
            raise FieldError(name, f"model {entry.name!r} makes {width}x{height} images, got {name} {value}")


def _settings(request: GenerationRequest, sampler: SamplerInfo) -> dict:
    """eta, s_churn, s_tmin, s_tmax (0: unbounded) and s_noise, for the samplers that take them."""
    accepted = inspect.signature(sampler.fn).parameters
    settings = {}
    for name in SAMPLER_SETTINGS:
        value = getattr(request, name)
        if value is None or name not in accepted:
            continue
        settings[name] = math.inf if name == "s_tmax" and value == 0 else float(value)
    return settings


def _fit(image: Image.Image, width: int, height: int, resize: str) -> np.ndarray:
    """``prepare_image`` for RGB at any width x height: uint8 (height, width, 3)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode in SIXTEEN_BIT_MODES:  # as prepare_image: 65535 / 257 = 255
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    image = image.convert("RGB")
    if resize == "crop":
        image = ImageOps.fit(image, (width, height), Image.BICUBIC, centering=(0.5, 0.5))
    else:
        image = image.resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _read_init(
    request: Img2ImgRequest, entry: ModelEntry, seed: int, plan: dict, size: tuple[int, int] | None = None
) -> None:
    """The init image (and mask) at the model's size, or at ``size`` (width, height) for a text-conditional
    model."""
    channels = entry.shape[0]
    if size is None:
        side = entry.shape[1]

        def prepare(image: Image.Image, channels: int, resize: str) -> np.ndarray:
            return prepare_image(image, channels, side, resize)
    else:

        def prepare(image: Image.Image, channels: int, resize: str) -> np.ndarray:
            pixels = _fit(image, *size, resize)
            return pixels if channels == 3 else pixels[..., :1]

    if request.resize_mode not in RESIZE_MODES:
        raise FieldError("resize_mode", f"{request.resize_mode} has no counterpart in inkwash; use 0 or 1")
    if len(request.init_images) > 1:
        raise FieldError("init_images", "one init image per request")
    resize = RESIZE_MODES[request.resize_mode]
    image = decode_image(request.init_images[0], "init_images")
    init = prepare(image, channels, resize)
    mask = None
    if request.mask is not None:
        mask_image = mask_channel(decode_image(request.mask, "mask"))
        if mask_image.size != image.size:
            mask_image = mask_image.resize(image.size, Image.BILINEAR)
        mask = prepare(mask_image, 1, resize)[..., 0] > 127
        if request.inpainting_mask_invert:
            mask = ~mask
        if request.mask_blur is not None:
            blur_x = blur_y = request.mask_blur
        else:
            blur_x, blur_y = request.mask_blur_x, request.mask_blur_y
        alpha = blur_mask(mask, blur_x, blur_y)
        generated = alpha >= 0.5  # the WebUI rounds the blurred mask for the sampler
        plan.update(
            original=init,
            init=fill_masked(init, generated, request.inpainting_fill, seed),
            mask=generated,
            alpha=alpha,
            extra_info={"Mask blur": blur_x if blur_x == blur_y else f"{blur_x}x{blur_y}"},
        )
    else:
        plan.update(init=init)


def plan_request(kind: str, request: GenerationRequest, store: ModelStore, limits: ServeOptions) -> Plan:
    """Check every field against the server's limits and the model, decode the images; a ``FieldError``
    names the first bad field. Nothing here loads weights or samples."""
    model = _model_name(request, store)
    entry = store.entry(model)
    _check_limits(request, entry, limits)
    named = bool(request.sampler_name)  # the WebUI's "sampler_name or sampler_index"
    name = request.sampler_name if named else request.sampler_index
    sampler, legacy_schedule = resolve_sampler(name, "sampler_name" if named else "sampler_index")
    schedule = resolve_schedule(request.scheduler)
    if schedule.schedule is None and legacy_schedule is not None:
        schedule = legacy_schedule
    text: dict = {}
    if entry.text_conditional:
        for name in CLASS_FIELDS:
            if name in (request.model_extra or {}):
                raise FieldError(
                    name, f"model {entry.name!r} takes a text prompt, not classes: send the text as prompt"
                )
        width, height = _check_size(request, entry, limits)
        prompt = negative = None
        text = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": width,
            "height": height,
        }
    else:
        _channels, height, width = entry.shape
        prompt = _check_class(request.prompt, "prompt", entry)
        negative = _check_class(request.negative_prompt, "negative_prompt", entry)
    seed = random.randrange(2**32) if request.seed == -1 else request.seed
    variation = request.subseed_strength > 0
    subseed = random.randrange(2**32) if request.subseed == -1 else request.subseed
    guided = prompt is not None or negative is not None or entry.text_conditional
    options = SampleOptions(
        checkpoint=str(entry.checkpoint),
        out="",
        sampler=sampler.id,
        steps=request.steps,
        schedule=schedule.schedule,
        num_images=request.batch_size * request.n_iter,
        batch_size=request.batch_size,
        seed=seed,
        subseed=subseed if variation else None,
        subseed_strength=request.subseed_strength if variation else 0.0,
        class_label=prompt,
        negative_class=negative,
        guidance_scale=float(request.cfg_scale) if guided else 1.0,
        strength=request.denoising_strength if isinstance(request, Img2ImgRequest) else 0.75,
        strip_points=1,
        show_progress=False,
        precision=limits.precision,
        device=limits.device,
        **text,  # a text-conditional model's prompts and size
    )
    try:
        options.validate()
    except InkwashError as exc:
        raise FieldError("request", str(exc)) from None
    extra: dict = {}
    if kind == "img2img":
        assert isinstance(request, Img2ImgRequest)
        _read_init(request, entry, seed, extra, (width, height) if entry.text_conditional else None)
    return Plan(
        kind,
        model,
        entry,
        options,
        sampler,
        schedule,
        _settings(request, sampler),
        seed,
        subseed,
        request,
        ignored_fields(request),
        width=width,
        height=height,
        **extra,
    )


def _infotext(plan: Plan, index: int, sha256: str) -> str:
    request = plan.request
    width, height = plan.width, plan.height
    params: dict = {
        "Steps": request.steps,
        "Sampler": plan.sampler.display_name,
        "Schedule type": plan.schedule.label,
        "CFG scale": float(request.cfg_scale),
        "Seed": plan.seed + index,
        "Size": f"{width}x{height}",
        "Model hash": sha256[:10],
        "Model": plan.model,
    }
    if plan.kind == "img2img":
        params["Denoising strength"] = plan.options.strength
        params.update(plan.extra_info)
    if plan.options.subseed is not None:
        params["Variation seed"] = plan.subseed + index
        params["Variation seed strength"] = plan.options.subseed_strength
    for name, label in (("eta", "Eta"), ("s_churn", "Sigma churn"), ("s_noise", "Sigma noise")):
        if name in plan.settings:
            params[label] = plan.settings[name]
    params["Version"] = VERSION
    return format_infotext(request.prompt.strip(), request.negative_prompt.strip(), params)


def save_pngs(folder: Path, encoded: list[str], seeds: list[int]) -> None:
    """Write each PNG as NNNNN-SEED.png, numbered on from the folder's highest number, as the WebUI
    does, so that nothing already there is overwritten (only the worker thread writes here)."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-", 1)[0]) for p in folder.glob("*-*.png") if p.name.split("-", 1)[0].isdigit()]
    start = max(numbers, default=-1) + 1
    for offset, (data, seed) in enumerate(zip(encoded, seeds, strict=True)):
        atomic_write_bytes(folder / f"{start + offset:05d}-{seed}.png", base64.b64decode(data))


def run_plan(plan: Plan, store: ModelStore, progress: Progress, save_dir: str | None = None) -> dict:
    """Sample a checked request on the worker thread; the WebUI's response body."""
    pipe = store.pipeline(plan.model)
    if type(pipe).decode is not Pipeline.decode:  # latents: the progress route decodes its preview
        progress.set_decoder(pipe.decode)
    sampling = pipe.config.get("sampling", {})
    if "clip_denoised" in sampling:  # a diffusers folder's clip_sample, as Pipeline.generate applies it
        plan.options.clip_denoised = bool(sampling["clip_denoised"])
    job = pipe.prepare(plan.options, init_image=plan.init, mask=plan.mask)
    job.sampler_options.update(plan.settings)
    batches = math.ceil(job.num_images / plan.options.batch_size)
    progress.plan(batches * job.steps_run, batches)
    result = pipe.run(job, on_step=lambda state: progress.on_step(state, job.steps_run, plan.options.batch_size))
    images = to_uint8(result.images)  # (N, H, W, C)
    if plan.alpha is not None and plan.original is not None:
        images = composite(images, plan.original[None], plan.alpha)
    sha256 = store.sha256(plan.model)
    infotexts = [_infotext(plan, i, sha256) for i in range(len(images))]
    encoded = [encode_png(pixels, text) for pixels, text in zip(images, infotexts, strict=True)]
    request = plan.request
    if request.save_images and save_dir is not None:
        save_pngs(Path(save_dir), encoded, [plan.seed + i for i in range(len(encoded))])
    width, height = plan.width, plan.height
    info = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(images),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(images),
        "seed": plan.seed,
        "all_seeds": [plan.seed + i for i in range(len(images))],
        "subseed": plan.subseed,
        "all_subseeds": [plan.subseed + i for i in range(len(images))],
        "subseed_strength": plan.options.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": plan.sampler.display_name,
        "scheduler": plan.schedule.label,
        "step_schedule": job.schedule,
        "cfg_scale": float(request.cfg_scale),
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "denoising_strength": plan.options.strength if plan.kind == "img2img" else None,
        "sd_model_name": plan.model,
        "sd_model_hash": sha256[:10],
        "sampler_settings": {k: 0.0 if math.isinf(v) else v for k, v in plan.settings.items()},  # s_tmax 0: unbounded
        "nfe": result.nfe,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "ignored_fields": plan.ignored,
        "saved": bool(request.save_images and save_dir is not None),
        "interrupted": result.interrupted,
        "job_timestamp": progress.timestamp,
        "version": VERSION,
    }
    return {
        "images": encoded if request.send_images else [],
        "parameters": request.model_dump(exclude={"init_images", "mask"}),
        "info": json.dumps(info, allow_nan=False),
    }


def preview_png(preview, decode=None) -> str | None:
    """Base64 PNG of the running batch's predicted x0, its images side by side; ``decode`` turns latents
    into [-1, 1] pixels first (``Pipeline.decode``)."""
    if preview is None:
        return None
    if decode is not None:
        preview = decode(preview)
    pixels = to_uint8(preview.float().clamp(-1, 1).cpu())  # (B, H, W, C)
    return encode_png(np.concatenate(list(pixels), axis=1))


class PreviewCache:
    """``current_image`` for the progress route: encoded once per preview update, whoever polls. A preview that
    must be decoded (a VAE decode of latents, seconds on a CPU, on the cores the sampler uses) is decoded again
    only after ``interval`` seconds, and after at least as long as the last decode took, so that decoding never
    takes more than half of the time however often clients poll; in between they get the last decoded one."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._png: str | None = None
        self._next = 0.0  # when a costly decode may run again

    def png(self, preview, decode, key: tuple) -> str | None:
        if preview is None:
            return None
        with self._lock:  # one encoding at a time; the other polls then find it done
            if key == self._key:
                return self._png
            same_task = self._key is not None and self._key[0] == key[0]
            if decode is not None and same_task and self._png is not None and time.monotonic() < self._next:
                return self._png
            started = time.monotonic()
            png = preview_png(preview, decode)
            took = time.monotonic() - started
            self._key, self._png = key, png
            self._next = time.monotonic() + max(self.interval, took)
            return png


__all__ = ["DEFAULT_STEPS", "Plan", "PreviewCache", "plan_request", "preview_png", "run_plan"]
