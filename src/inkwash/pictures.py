"""Pictures as PNG: sample grids, forward-noising and reverse strips, and the loss curve."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from inkwash.core.schedule import NoiseSchedule
from inkwash.data.loading import to_uint8
from inkwash.files import atomic_write_bytes
from inkwash.training.log import read_log

BACKGROUND = (255, 255, 255)


def _scale_for(size: int) -> int:
    """Integer upscaling so that small images are visible (16 px -> 64 px)."""
    return max(1, 64 // size)


def save_png(image: Image.Image, path: str | Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _to_rgb_tile(pixels: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image = image.convert("RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def tile(
    rows: Sequence[np.ndarray],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Lay out rows of uint8 (N, H, W, C) images into one picture, with optional labels."""
    size = rows[0].shape[1]
    scale = _scale_for(size)
    cell = size * scale
    cols = max(len(r) for r in rows)
    left = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = 14 if col_labels else 0
    width = left + cols * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = top + pad + r * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for c, pixels in enumerate(row):
            canvas.paste(_to_rgb_tile(pixels, scale), (left + pad + c * (cell + pad), y))
    if col_labels:
        for c, label in enumerate(col_labels):
            draw.text((left + pad + c * (cell + pad) + 2, 2), label, fill=(0, 0, 0))
    return canvas


def sample_grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """A square-ish grid of images in [-1, 1], (N, C, H, W)."""
    pixels = to_uint8(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(pixels))))
    return tile([pixels[i : i + nrow] for i in range(0, len(pixels), nrow)])


def noising_strip(
    schedule: NoiseSchedule,
    images: torch.Tensor,
    ts: Sequence[int],
    generator: torch.Generator | None = None,
) -> Image.Image:
    """The forward process on real images: one row per image, one column per t.

    ``t`` counts noising steps as in the seed: t = 0 is the clean image, t = T the last step
    (schedule index t - 1), each drawn in one closed-form step from x0.
    """
    noise = torch.randn(images.shape, generator=generator)
    columns = []
    for t in ts:
        if t == 0:
            columns.append(images)
        else:
            index = torch.full((images.shape[0],), t - 1, dtype=torch.long)
            columns.append(schedule.q_sample(images, index, noise))
    rows = [to_uint8(torch.stack([col[i] for col in columns])) for i in range(images.shape[0])]
    return tile(rows, col_labels=[f"t={t}" for t in ts])


def reverse_strip(
    trajectory: Sequence[tuple[float, torch.Tensor, torch.Tensor]], final: torch.Tensor, num_images: int = 4
) -> Image.Image:
    """The noise being removed: for each image, a row of x_t (variance-preserving scale) and a row
    of the predicted x0 at the recorded steps, ending with the final sample."""
    rows, labels = [], []
    available = min([final.shape[0]] + [x.shape[0] for _, x, _ in trajectory])
    for i in range(min(num_images, available)):
        xs = [x[i] / math.sqrt(1.0 + sigma**2) for sigma, x, _ in trajectory] + [final[i]]
        x0s = [d[i] for _, _, d in trajectory] + [final[i]]
        rows += [to_uint8(torch.stack(xs)), to_uint8(torch.stack(x0s))]
        labels += ["x_t", "x0^"]
    col_labels = [f"s={sigma:.3g}" for sigma, _, _ in trajectory] + ["final"]
    return tile(rows, row_labels=labels, col_labels=col_labels)


TRAINING_COLUMNS = ("step", "loss", "lr", "images_per_sec", "skipped")


def loss_curve(log_path: str | Path, out_path: str | Path) -> None:
    """Plot loss against step from the training CSV (log scale, with a running mean), and beside it
    the evaluation scores of ``--eval-every`` with their real-data floors, when the log has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(log_path)
    steps, losses = log.get("step", []), log.get("loss", [])
    scores = [k for k in log if k not in TRAINING_COLUMNS and not k.endswith(("_floor", "_std")) and "px" not in k]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0, 0]
    if steps:
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if scores:
        ax = axes[0, 1]
        for name in scores:
            points = [(x, y) for x, y in zip(steps, log[name], strict=True) if not math.isnan(y)]
            if not points:
                continue
            line = ax.plot(*zip(*points, strict=True), marker="o", lw=1.2, label=name)[0]
            floor = [y for y in log.get(f"{name}_floor", []) if not math.isnan(y)]
            if floor:
                ax.axhline(floor[-1], color=line.get_color(), ls="--", lw=0.8, label=f"{name} real-data floor")
        ax.set_xlabel("step")
        ax.set_ylabel("evaluation score")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())
