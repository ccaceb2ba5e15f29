"""``inkwash sample``: load a run, sample with a chosen sampler and step schedule, write files.

The sampling itself is ``inkwash.pipeline.Pipeline`` (what ``inkwash.load(...).generate(...)`` runs);
this command adds the PNGs, the grid, samples.npz, the reverse-process strip and sampling.json."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from inkwash.core.precision import resolve_precision
from inkwash.data.loading import to_uint8
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes, atomic_write_text
from inkwash.pictures import reverse_strip, sample_grid, save_png, tile
from inkwash.pipeline import Pipeline, check_request
from inkwash.sampling.options import SampleOptions

__all__ = ["SampleOptions", "sample_run", "savez_bytes"]


def savez_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def sample_run(options: SampleOptions) -> dict:
    """Sample ``options.num_images`` images (or ``per_class`` of every class with ``grid_by_class``) and
    write PNGs, grid.png, samples.npz, reverse.png and sampling.json."""
    check_request(options)  # before the weights are read
    # --precision also picks the dtype of a Stable Diffusion folder's weights (fp16 / bf16 halve their memory)
    pipe = Pipeline.load(
        options.checkpoint, use_ema=options.use_ema, device=options.device, precision=options.precision
    )
    job = pipe.prepare(options)  # every check, and the init image and mask read, before anything is written
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InkwashError(f"--out must be a directory, got a file: {out}")
    out.mkdir(parents=True, exist_ok=True)

    def write_batch(start: int, images: torch.Tensor) -> None:
        from PIL import Image

        for offset, pixels in enumerate(to_uint8(images)):
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            save_png(image, out / f"{start + offset:06d}.png")

    result = pipe.run(job, on_batch=write_batch)
    names, labels, num_images = pipe.class_names, job.labels, job.num_images
    atomic_write_bytes(out / "samples.npz", savez_bytes(samples=to_uint8(result.images)))
    if options.grid_by_class:
        per_class = num_images // len(names)
        rows = [to_uint8(result.images[c * per_class : (c + 1) * per_class]) for c in range(len(names))]
        save_png(tile(rows, row_labels=names), out / "grid.png")
    else:
        save_png(sample_grid(result.images), out / "grid.png")
    if result.trajectory:
        save_png(reverse_strip(pipe.decode_trajectory(result.trajectory), result.images), out / "reverse.png")
    summary = {
        "sampler": job.sampler.id,
        "schedule": job.schedule,
        "steps": job.steps,
        "steps_run": job.steps_run,
        "nfe": result.nfe,
        "num_images": num_images,
        "seed": options.seed,
        "guidance_scale": job.guidance_scale,
        "class_names": names or None,
        "labels": None if labels is None or not names else [int(label) for label in labels.expand(num_images)],
        "checkpoint_step": pipe.config.get("step"),
        "device": str(pipe.device),
        "precision": resolve_precision(options.precision, pipe.device),
        "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
    }
    atomic_write_text(out / "sampling.json", json.dumps(summary, indent=2) + "\n")
    return summary
