"""Training data: the bundled UCI digits and folders of images, held in memory as tensors."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InkwashError
from .progress import progress


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64, or None when unlabeled
    class_names: list[str] | None
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_digits(image_size: int = 16) -> ImageData:
    """The 1,797 8x8 UCI handwritten digits bundled with scikit-learn, upsampled bilinearly."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    raw = (bunch.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8), ink is bright
    if image_size != 8:
        raw = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR)) for im in raw])
    return ImageData(
        images=to_unit_range(raw[..., None]),
        labels=torch.from_numpy(bunch.target.astype(np.int64)),
        class_names=[str(d) for d in range(10)],
        source="digits",
    )


def prepare_image(image: Image.Image, channels: int, image_size: int) -> np.ndarray:
    """Apply EXIF orientation, flatten transparency onto white, convert to the model's channels,
    resize the short side to image_size and center-crop. Returns uint8 (H, W, C)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    image = ImageOps.fit(image, (image_size, image_size), Image.BICUBIC, centering=(0.5, 0.5))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_folder(path: str | Path, channels: int, image_size: int, show_progress: bool = True) -> ImageData:
    """Every image Pillow can read under ``path`` (recursively); unreadable files are counted."""
    root = Path(path)
    if not root.exists():
        raise InkwashError(f"data folder not found: {root}")
    if not root.is_dir():
        raise InkwashError(f"--data must be 'digits' or a folder of images, got a file: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    arrays, skipped = [], 0
    for file in progress(files, desc="loading images", unit="img", disable=not show_progress):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(file) as image:
                    image.load()
                    arrays.append(prepare_image(image, channels, image_size))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            skipped += 1
    if skipped:
        print(f"warning: skipped {skipped} unreadable file(s) of {len(files)} in {root}", file=sys.stderr)
    if not arrays:
        raise InkwashError(f"no readable images in {root} ({len(files)} file(s) tried)")
    return ImageData(
        images=to_unit_range(np.stack(arrays)), labels=None, class_names=None, source=str(root), skipped=skipped
    )


def load_data(spec: str, channels: int, image_size: int, show_progress: bool = True) -> ImageData:
    """``digits`` or a folder path."""
    if spec == "digits":
        if channels != 1:
            data = load_digits(image_size)
            data.images = data.images.expand(-1, channels, -1, -1).contiguous()
            return data
        return load_digits(image_size)
    return load_folder(spec, channels, image_size, show_progress)
