"""Training data held in memory as one tensor: the bundled UCI digits, MNIST, Fashion-MNIST, CIFAR-10 and
folders of images (optionally one subfolder per class), with a per-reason count of the files skipped."""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from inkwash.data.cache import cache_file, cache_key, default_cache_dir, read_cache, write_cache
from inkwash.data.standard import SPLITS, STANDARD_DATASETS, load_standard
from inkwash.data.walk import list_files
from inkwash.errors import InkwashError
from inkwash.progress import progress

RESIZE_MODES = ("crop", "resize")
DIGITS_SPLITS = ("all", "train", "test")
SPLIT_SEED = 0  # the fixed seed of every train / test halving (digits, and evaluation references)
# Images whose shorter side is under this (or under image_size, if smaller) are skipped as "too small":
# they are icons, spacers and tracking pixels, and upscaling them would only add blur to the data.
MIN_IMAGE_SIDE = 8
# Pillow raises a zoo of exception types on corrupt input; these are the ones Image.open itself catches,
# plus the I/O errors of a truncated or unreadable file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64, or None when unlabeled
    class_names: list[str] | None
    source: str
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def class_counts(self) -> list[int] | None:
        """Images per class index (None for unlabeled data): the class prior inkwash eval draws from."""
        if self.labels is None or not self.class_names:
            return None
        return torch.bincount(self.labels.long(), minlength=len(self.class_names)).tolist()


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    pixels = pixels if pixels.flags.writeable else pixels.copy()  # a view of a PIL image is read-only
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``batch`` (B, C, H, W) left-right with probability 1/2, drawn from ``generator``."""
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5  # (B,)
    flip = flip.to(batch.device)[:, None, None, None]
    return torch.where(flip, batch.flip(-1), batch)


def split_indices(
    num: int, labels: torch.Tensor | None = None, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed half/half split of ``num`` items, (train, test) sorted index arrays.

    With labels, each class is split on its own, so both halves keep the class proportions.
    """
    if num < 2:
        raise InkwashError(f"a reference needs at least 2 images to split in two, got {num}")
    generator = np.random.default_rng(seed)
    groups = [np.arange(num)] if labels is None else [np.flatnonzero(labels.numpy() == c) for c in labels.unique()]
    train, test = [], []
    for group in groups:
        order = generator.permutation(group)
        cut = (len(order) + 1) // 2
        train.append(order[:cut])
        test.append(order[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(image_size: int = 16, split: str = "all") -> ImageData:
    """The 1,797 8x8 UCI handwritten digits bundled with scikit-learn, upsampled bilinearly.

    ``split``: ``all``, or the ``train`` (901 images) or ``test`` (896) half of the fixed class-stratified split
    that evaluation uses (``inkwash.evaluation.reference``). Training on ``--data digits`` takes the train half, so
    the test half stays held out for FID and bits/dim.
    """
    if split not in DIGITS_SPLITS:
        raise InkwashError(f"digits split must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    raw = (bunch.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8), ink is bright
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split != "all":
        halves = split_indices(len(labels), labels)
        keep = halves[0] if split == "train" else halves[1]
        raw, labels = raw[keep], labels[torch.from_numpy(keep)]
    if image_size != 8:
        raw = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR)) for im in raw])
    return ImageData(
        images=to_unit_range(raw[..., None]),
        labels=labels,
        class_names=[str(d) for d in range(10)],
        source="digits" if split == "all" else f"digits ({split} half)",
    )


def _check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in RESIZE_MODES:
        raise InkwashError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")


def prepare_image(image: Image.Image, channels: int, image_size: int, resize_mode: str = "crop") -> np.ndarray:
    """Apply EXIF orientation, scale 16-bit pixels to 8 bits, flatten transparency onto white, convert to
    the model's channels, then either resize the short side and center-crop (``crop``) or squash to a
    square (``resize``). Returns uint8 (H, W, C)."""
    _check_resize_mode(resize_mode)
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; 65535 / 257 = 255 maps the full range.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    size = (image_size, image_size)
    if resize_mode == "crop":
        image = ImageOps.fit(image, size, Image.BICUBIC, centering=(0.5, 0.5))
    else:
        image = image.resize(size, Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _skip_labels(min_side: int) -> dict[str, str]:
    """Reason key -> how the warning names it, in the order the warning lists them."""
    limit = Image.MAX_IMAGE_PIXELS
    return {
        "outside classes": "outside the class folders",
        "empty": "empty",
        "unknown format": "of unknown format",
        "unreadable": "unreadable (truncated or corrupt)",
        "unsupported mode": "in an unsupported mode",
        "too small": f"too small (a side under {min_side} px)",
        "bomb": f"over Pillow's decompression-bomb limit of {limit} pixels",
    }


def _decode(
    file: Path, num_bytes: int, channels: int, image_size: int, resize_mode: str, min_side: int
) -> np.ndarray | str:
    """The file's prepared pixels, or the reason (a key of _skip_labels) it is skipped."""
    if num_bytes == 0:
        return "empty"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both count as over the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if min(image.size) < min_side:
                    return "too small"
                # JPEGs can decode at 1/2, 1/4 or 1/8 scale, never below the requested size: much faster.
                image.draft(None, (image_size, image_size))
                image.load()
                try:
                    return prepare_image(image, channels, image_size, resize_mode)
                except ValueError:
                    return "unsupported mode"
    except Image.UnidentifiedImageError:
        return "unknown format"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "bomb"
    except DECODE_ERRORS:
        return "unreadable"


def _warn_skips(root: Path, counts: dict[str, int], num_files: int, min_side: int) -> None:
    total = sum(counts.values())
    if total:
        labels = _skip_labels(min_side)
        reasons = ", ".join(f"{counts[key]} {label}" for key, label in labels.items() if counts.get(key))
        print(f"warning: skipped {total} of {num_files} files in {root}: {reasons}", file=sys.stderr)


def _decode_files(
    files: list[Path],
    relative: list[tuple[str, ...]],
    stats: list[os.stat_result],
    class_names: list[str] | None,
    settings: dict,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, int]]:
    """uint8 (N, H, W, C) pixels of the usable files, their int64 labels (None without classes) and the
    skip counts by reason."""
    channels, image_size = settings["channels"], settings["image_size"]
    arrays, labels, counts = [], [], Counter()
    class_index = {name: i for i, name in enumerate(class_names or [])}
    files = progress(files, desc="loading images", unit="img", disable=not show_progress)
    for file, parts, stat in zip(files, relative, stats, strict=True):
        if class_names is not None and len(parts) == 1:
            counts["outside classes"] += 1
            continue
        result = _decode(file, stat.st_size, channels, image_size, settings["resize_mode"], settings["min_side"])
        if isinstance(result, str):
            counts[result] += 1
            continue
        arrays.append(result)
        if class_names is not None:
            labels.append(class_index[parts[0]])
    pixels = np.stack(arrays) if arrays else np.zeros((0, image_size, image_size, channels), np.uint8)
    return pixels, None if class_names is None else np.array(labels, dtype=np.int64), dict(counts)


def load_folder(
    path: str | Path,
    channels: int,
    image_size: int,
    show_progress: bool = True,
    *,
    class_cond: bool = False,
    resize_mode: str = "crop",
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> ImageData:
    """Every image under ``path`` (recursively). With ``class_cond`` each first-level subfolder is a class
    (labels in sorted name order) and files directly in ``path`` are skipped. Files that cannot be used
    are skipped and counted by reason. Decoded folders are cached on disk (see data_cache)."""
    root = Path(path)
    if not root.exists():
        raise InkwashError(
            f"data folder not found: {root} (--data takes digits, {', '.join(STANDARD_DATASETS)} or a folder)"
        )
    if not root.is_dir():
        raise InkwashError(
            f"--data must be digits, {', '.join(STANDARD_DATASETS)} or a folder of images, got a file: {root}"
        )
    _check_resize_mode(resize_mode)
    files = list_files(root)
    relative = [file.relative_to(root).parts for file in files]
    class_names = sorted({parts[0] for parts in relative if len(parts) > 1}) if class_cond else None
    if class_cond and not class_names:
        raise InkwashError(f"--class-cond needs one subfolder per class in {root}; it has no subfolders with files")
    min_side = min(MIN_IMAGE_SIDE, image_size)
    settings = {
        "channels": channels,
        "image_size": image_size,
        "resize_mode": resize_mode,
        "class_cond": class_cond,
        "min_side": min_side,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
    }
    stats = [file.stat() for file in files]
    if cache:
        entry = cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), root, settings)
        key = cache_key(
            settings, [("/".join(p), s.st_size, s.st_mtime_ns) for p, s in zip(relative, stats, strict=True)]
        )
        cached = read_cache(entry, key)
    else:
        cached = None
    if cached is not None:
        pixels, counts = cached["pixels"], json.loads(str(cached["meta"]))["skipped"]
        labels = cached["labels"] if class_cond else None
    else:
        pixels, labels, counts = _decode_files(files, relative, stats, class_names, settings, show_progress)
    _warn_skips(root, counts, len(files), min_side)
    if not len(pixels):
        raise InkwashError(f"no readable images in {root} ({len(files)} file(s) tried)")
    if cache and cached is None:
        arrays = {"pixels": pixels, "meta": np.array(json.dumps({"skipped": counts}))}
        write_cache(entry, key, arrays if labels is None else {**arrays, "labels": labels})
    return ImageData(
        images=to_unit_range(pixels),
        labels=None if labels is None else torch.from_numpy(labels),
        class_names=class_names,
        source=str(root),
        skipped=sum(counts.values()),
        skipped_by_reason=counts,
    )


def _conform(pixels: np.ndarray, channels: int, image_size: int, resize_mode: str, show_progress: bool) -> np.ndarray:
    """Bring uint8 (N, H, W, C) pixels to the model's channels and size, through prepare_image."""
    if pixels.shape[1:] == (image_size, image_size, channels):
        return pixels
    squeeze = pixels.shape[-1] == 1
    return np.stack(
        [
            prepare_image(Image.fromarray(p[..., 0] if squeeze else p), channels, image_size, resize_mode)
            for p in progress(pixels, desc="resizing", unit="img", disable=not show_progress)
        ]
    )


def load_data(
    spec: str,
    channels: int,
    image_size: int,
    show_progress: bool = True,
    *,
    class_cond: bool = False,
    resize_mode: str = "crop",
    data_dir: str | Path = "data",
    split: str = "train",
    download: bool = False,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> ImageData:
    """``digits``, ``mnist``, ``fashion-mnist`` or ``cifar10`` (read from ``data_dir``; ``split`` picks
    train or test; ``download`` fetches missing files), or a folder path (see load_folder)."""
    _check_resize_mode(resize_mode)
    if split not in SPLITS:
        raise InkwashError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if spec in STANDARD_DATASETS:
        pixels, labels, class_names = load_standard(spec, data_dir, split, download, show_progress)
        return ImageData(
            images=to_unit_range(_conform(pixels, channels, image_size, resize_mode, show_progress)),
            labels=torch.from_numpy(labels),
            class_names=class_names,
            source=spec,
        )
    if spec == "digits":
        data = load_digits(image_size, split)
        if channels != 1:
            data.images = data.images.expand(-1, channels, -1, -1).contiguous()
        return data
    if split != "train":
        raise InkwashError(f"a test split exists only for digits, {', '.join(STANDARD_DATASETS)}, not for {spec!r}")
    return load_folder(
        spec,
        channels,
        image_size,
        show_progress,
        class_cond=class_cond,
        resize_mode=resize_mode,
        cache=cache,
        cache_dir=cache_dir,
    )
