"""Drive a sampler over a run of images: per-sample seeds, batching and model-evaluation counts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from inkwash.core.denoiser import ClampedDenoiser, Denoiser, PlacedDenoiser
from inkwash.core.rng import SampleRNG, sample_seeds
from inkwash.core.sigmas import validate_sigmas
from inkwash.progress import progress
from inkwash.sampling.guidance import GuidedDenoiser
from inkwash.sampling.img2img import InpaintDenoiser
from inkwash.sampling.samplers import get_sampler


class CountingDenoiser:
    """Wraps a denoiser and counts its calls and the images it evaluated.

    ``rows`` sums the batch sizes it saw: a guided call evaluates each image twice in one call on the
    doubled batch, so model evaluations per image (the NFE we report) are rows / images, not calls.
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0
        self.rows = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, cond)


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    nfe: int  # model evaluations per image; two per guided call
    trajectory: list[tuple[float, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _rows(images: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows start .. start+count-1 of a (N, ...) tensor, cycling; a single row is broadcast."""
    index = torch.arange(start, start + count) % images.shape[0]
    return images[index]


def prior_sample(rng: SampleRNG, shape: Sequence[int], sigma_max: float) -> torch.Tensor:
    """x at sigma_max: DDPM's N(0, I) prior expressed in the x0 + sigma*eps convention."""
    return rng.randn(shape) * math.sqrt(1.0 + sigma_max**2)


def generate(
    denoiser: Denoiser,
    image_shape: Sequence[int],
    sigmas: torch.Tensor,
    *,
    sampler: str = "ddim",
    num_images: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sampler_options: dict | None = None,
    record: Sequence[int] = (),
    show_progress: bool = True,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    init: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    clip_denoised: bool = False,
    precision: str = "fp32",
) -> SampleResult:
    """Sample ``num_images`` images; image i uses seed ``seed + i`` for all of its noise.

    ``record`` lists step indices at which (sigma, x, denoised) of the first batch are kept,
    for the reverse-process strip. With ``init`` (N or 1, C, H, W) the run starts from
    ``init + sigmas[0] * noise`` (img2img, see ``img2img.strength_sigmas``); with ``mask``
    (1 where generated, 0 where kept) it inpaints.

    ``labels`` (N or 1,) are class indices passed to the denoiser as ``cond``; image i gets row i, so
    it depends only on its seed and label. ``guidance_scale`` w != 1 applies classifier-free guidance
    (``guidance.GuidedDenoiser``) and needs ``null_label``, the model's "no class" index
    (``UNetConfig.num_classes``). ``clip_denoised`` clips each denoised estimate to [-1, 1] after
    guidance, as diffusers' ``clip_sample`` and Imagen's static thresholding do. DDIM steps along the
    network's own noise estimate from the clipped x0, as diffusers' DDIM does (``sample_ddim``'s ``clip_range``).

    ``device`` is where the images are sampled (the network must already be there); ``precision``
    ``bf16`` or ``fp16`` autocasts the network's calls (``denoiser.PlacedDenoiser``), while the
    sampler, guidance and clipping arithmetic stays fp32.
    """
    if mask is not None and init is None:
        raise ValueError("inpainting needs an init image")
    if not guidance_scale >= 0.0:
        raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
    if guidance_scale != 1.0 and (labels is None or null_label is None):
        raise ValueError("classifier-free guidance needs labels and the model's null_label")
    validate_sigmas(sigmas)
    info = get_sampler(sampler)
    options = dict(sampler_options or {})
    counter = CountingDenoiser(PlacedDenoiser(denoiser, device, precision))
    model_denoiser: Denoiser = counter
    if guidance_scale != 1.0:
        model_denoiser = GuidedDenoiser(model_denoiser, guidance_scale, null_label)
    if clip_denoised and info.own_clip:
        options["clip_range"] = 1.0  # DDIM clips x0 itself and keeps the network's noise, as diffusers does
    elif clip_denoised:
        model_denoiser = ClampedDenoiser(model_denoiser)
    chunks: list[torch.Tensor] = []
    trajectory: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    record_set = set(record)
    total_steps = len(sigmas) - 1
    bar = progress(total=num_images * total_steps, desc=f"sampling ({info.id})", unit="step", disable=not show_progress)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        rng = SampleRNG(sample_seeds(seed, count, start), device=device)
        batch_denoiser = model_denoiser
        cond = None if labels is None else _rows(labels, start, count).to(device)  # (B,)
        if init is None:
            x = prior_sample(rng, image_shape, float(sigmas[0])).to(device)
        else:
            batch_init = _rows(init, start, count).to(device)
            first_noise = rng.randn(image_shape).to(device)
            x = batch_init + float(sigmas[0]) * first_noise
            if mask is not None:
                batch_denoiser = InpaintDenoiser(
                    model_denoiser, batch_init, _rows(mask, start, count).to(device), first_noise
                )
        keep = trajectory if start == 0 else None

        def callback(state: dict, count: int = count, keep: list | None = keep) -> None:
            bar.update(count)
            if keep is not None and state["i"] in record_set:
                keep.append((state["sigma"], state["x"].cpu(), state["denoised"].cpu()))

        rows_before = counter.rows
        out = info.fn(
            batch_denoiser,
            x,
            sigmas.to(device),
            noise=lambda rng=rng, x=x: rng.randn_like(x),
            callback=callback,
            cond=cond,
            **options,
        )
        if isinstance(batch_denoiser, InpaintDenoiser):
            out = batch_denoiser.finish(out)
        nfe = (counter.rows - rows_before) // count
        out = out.clamp(-1, 1).cpu()
        if on_batch is not None:
            on_batch(start, out)
        chunks.append(out)
    bar.close()
    images = torch.cat(chunks) if chunks else torch.empty(0, *image_shape)
    return SampleResult(images=images, nfe=nfe if chunks else 0, trajectory=trajectory)
