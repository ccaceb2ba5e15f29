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


class SamplingInterrupted(Exception):
    """Raised by an ``on_step`` hook to stop sampling: the interrupted batch returns its latest predicted
    x0 and no further batch is started (``SampleResult.interrupted``)."""


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
    interrupted: bool = False  # an ``on_step`` hook stopped the run; ``images`` holds the batches it reached


def cycle_rows(images: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows start .. start+count-1 of a (N, ...) tensor, cycling; a single row is broadcast."""
    index = torch.arange(start, start + count) % images.shape[0]
    return images[index]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), per row of (B, ...) tensors, the way
    the WebUI blends a seed's noise toward a variation seed's; nearly parallel rows are mixed linearly."""
    flat_a, flat_b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))  # (B,)
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    near = sin.abs() < 1e-4
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t + 0 * omega, torch.sin((1 - t) * omega) / safe)[:, None]
    wb = torch.where(near, t + 0 * omega, torch.sin(t * omega) / safe)[:, None]
    return (wa * flat_a + wb * flat_b).to(a.dtype).reshape(a.shape)


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
    null_label: int | torch.Tensor | None = None,
    clip_denoised: bool = False,
    output_range: float | None = 1.0,
    precision: str = "fp32",
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    on_step: Callable[[dict], None] | None = None,
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
    The result is clamped to [-output_range, output_range] (None: not at all, for latents). A schedule that ends
    above sigma 0 (DDIM with ``set_alpha_to_one`` false) returns the variance-preserving state there,
    x / sqrt(1 + sigma^2), as diffusers' schedulers do.

    ``device`` is where the images are sampled (the network must already be there); ``precision``
    ``bf16`` or ``fp16`` autocasts the network's calls (``denoiser.PlacedDenoiser``), while the
    sampler, guidance and clipping arithmetic stays fp32.

    ``subseed`` with ``subseed_strength`` s in (0, 1] are the WebUI's variation seeds: image i's starting
    noise is its seed's noise slerped by s toward the noise of seed ``subseed + i`` (the noise the sampler
    adds later still comes from ``seed + i``). ``on_step(state)`` sees every step of every batch: the
    sampler's callback dict plus ``start`` (the batch's first image) and ``batch`` (its size); raising
    ``SamplingInterrupted`` there stops the run (``SampleResult.interrupted``).
    """
    if not 0.0 <= subseed_strength <= 1.0:
        raise ValueError(f"subseed strength must be in [0, 1], got {subseed_strength}")
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
    interrupted = False
    bar = progress(total=num_images * total_steps, desc=f"sampling ({info.id})", unit="step", disable=not show_progress)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        rng = SampleRNG(sample_seeds(seed, count, start), device=device)
        batch_denoiser = model_denoiser
        cond = None if labels is None else cycle_rows(labels, start, count).to(device)  # (B,)
        first_noise = rng.randn(image_shape)
        if subseed is not None and subseed_strength > 0:
            variation = SampleRNG(sample_seeds(subseed, count, start), device=device).randn(image_shape)
            first_noise = slerp(subseed_strength, first_noise, variation)
        first_noise = first_noise.to(device)
        if init is None:
            x = first_noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)  # DDPM's N(0, I) prior at sigma_max
        else:
            batch_init = cycle_rows(init, start, count).to(device)
            x = batch_init + float(sigmas[0]) * first_noise
            if mask is not None:
                batch_denoiser = InpaintDenoiser(
                    model_denoiser, batch_init, cycle_rows(mask, start, count).to(device), first_noise
                )
        keep = trajectory if start == 0 else None

        latest: dict = {}

        def callback(
            state: dict, count: int = count, keep: list | None = keep, start: int = start, latest: dict = latest
        ) -> None:
            bar.update(count)
            latest["denoised"] = state["denoised"]
            if keep is not None and state["i"] in record_set:
                keep.append((state["sigma"], state["x"].cpu(), state["denoised"].cpu()))
            if on_step is not None:
                on_step({**state, "start": start, "batch": count})

        rows_before = counter.rows
        try:
            out = info.fn(
                batch_denoiser,
                x,
                sigmas.to(device),
                noise=lambda rng=rng, x=x: rng.randn_like(x),
                callback=callback,
                cond=cond,
                **options,
            )
        except SamplingInterrupted:
            interrupted = True
            out = latest.get("denoised", x)
        if isinstance(batch_denoiser, InpaintDenoiser):
            out = batch_denoiser.finish(out)
        nfe = (counter.rows - rows_before) // count
        if float(sigmas[-1]) > 0 and not interrupted:
            out = out / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
        if output_range is not None:
            out = out.clamp(-output_range, output_range)
        out = out.cpu()
        if on_batch is not None:
            on_batch(start, out)
        chunks.append(out)
        if interrupted:
            break
    bar.close()
    images = torch.cat(chunks) if chunks else torch.empty(0, *image_shape)
    return SampleResult(images=images, nfe=nfe if chunks else 0, trajectory=trajectory, interrupted=interrupted)
