"""Reference data for evaluation: a dataset cut into two fixed halves, and its features cached on disk.

A reference is ``digits``, a folder of images, or an ``.npz`` of uint8 images. A fixed-seed split
(stratified by label where there are labels) makes a *train* half and a *test* half. Samples are
scored against the test half; the train half scored against the test half, at the same count, is the
real-data floor: the score that real images of the same distribution get, which is what a score can
be read against (FID, for one, is biased upwards by a finite sample and is never 0).

Features of both halves are cached per dataset and feature extractor as an ``.npz`` read with
``allow_pickle=False``, under a name that hashes everything they depend on: what the data is (the
digits' scikit-learn version, a folder's file list with sizes and mtimes, an .npz file's size and
mtime), a hash of the pixels themselves, the image shape and count, the split and the extractor's
identity (its name and a hash of its weights). A stale cache is never read: anything that changes
the features changes the name.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inkwash.data.cache import cache_root
from inkwash.data.loading import SPLIT_SEED, load_data, load_digits, split_indices, to_unit_range
from inkwash.data.walk import list_files
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes

CACHE_FORMAT = 1
NPZ_IMAGE_KEYS = ("samples", "images")


@dataclass
class Reference:
    """Real images (N, C, H, W) in [-1, 1] with their fixed train / test halves."""

    name: str
    images: torch.Tensor
    source: dict  # what the data is, for the cache key (see the module docstring)
    train_index: np.ndarray
    test_index: np.ndarray

    @property
    def train(self) -> torch.Tensor:
        return self.images[torch.from_numpy(self.train_index)]

    @property
    def test(self) -> torch.Tensor:
        return self.images[torch.from_numpy(self.test_index)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_image_array(path: str | Path) -> torch.Tensor:
    """Images from an .npz: uint8 (N, H, W, C) or (N, H, W) under ``samples`` or ``images`` (or its only
    array), as written by ``inkwash sample``. Returns (N, C, H, W) float32 in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise InkwashError(f"file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InkwashError(f"{path} is not an .npz archive (it holds a single array)")
        with archive:
            named = [k for k in NPZ_IMAGE_KEYS if k in archive.files]
            if not named and len(archive.files) != 1:
                raise InkwashError(f"{path} holds several arrays ({', '.join(archive.files)}) and none is 'samples'")
            array = archive[(named or archive.files)[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise InkwashError(f"cannot read {path} as an .npz of images: {_first_line(exc)}") from None
    if array.dtype != np.uint8:
        raise InkwashError(f"{path}: images must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise InkwashError(f"{path}: expected uint8 images N x H x W x C with C = 1 or 3, got shape {array.shape}")
    return to_unit_range(np.ascontiguousarray(array))


def _folder_listing(root: Path) -> list[list]:
    """(relative path, size, mtime_ns) of every file ``data.load_folder`` tries (``data.walk.list_files``)."""
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in list_files(root)]


def load_reference(spec: str, image_shape: tuple[int, int, int], show_progress: bool = False) -> Reference:
    """``digits``, a folder (loaded at the samples' channels and size) or an .npz of uint8 images."""
    channels, size = image_shape[0], image_shape[1]
    path = Path(spec)
    if spec != "digits" and path.suffix.lower() == ".npz":
        images = load_image_array(path)
        if tuple(images.shape[1:]) != tuple(image_shape):
            raise InkwashError(
                f"reference images in {path} are {tuple(images.shape[1:])} (C, H, W) but the samples are "
                f"{tuple(image_shape)}"
            )
        stat = path.stat()
        source = {"kind": "npz", "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        labels = None
    else:
        if spec != "digits" and not path.is_dir():
            raise InkwashError(f"--reference must be 'digits', a folder of images or an .npz, got {spec!r}")
        # digits: all 1,797 images (training on ``--data digits`` sees only the train half)
        data = load_digits(size, "all") if spec == "digits" else load_data(spec, channels, size, show_progress)
        images, labels = data.images, data.labels
        if images.shape[1] != channels:
            images = images.expand(-1, channels, -1, -1).contiguous()
        if spec == "digits":
            import sklearn

            source = {"kind": "digits", "sklearn": sklearn.__version__}
        else:
            source = {"kind": "folder", "path": str(path.resolve()), "files": _folder_listing(path)}
    train, test = split_indices(images.shape[0], labels)
    return Reference(name=spec, images=images, source=source, train_index=train, test_index=test)


def cache_key(reference: Reference, extractor_identity: str) -> str:
    """A hex digest of everything the cached features depend on."""
    pixels = hashlib.sha256(reference.images.numpy().tobytes()).hexdigest()
    description = {
        "format": CACHE_FORMAT,
        "data": reference.source,
        "pixels_sha256": pixels,
        "shape": list(reference.images.shape),
        "split_seed": SPLIT_SEED,
        "extractor": extractor_identity,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def reference_features(
    reference: Reference,
    extractor_identity: str,
    extract: Callable[[torch.Tensor], np.ndarray],
    directory: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, F) of the train and test halves, from the cache when its key matches, else
    computed with ``extract`` and written atomically."""
    key = cache_key(reference, extractor_identity)
    path = Path(directory or cache_root()) / "reference" / f"{key[:32]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["key"]) == key:
                    return cached["train"], cached["test"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file is recomputed and replaced below
    train, test = extract(reference.train), extract(reference.test)
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), train=train, test=test)
    atomic_write_bytes(path, buffer.getvalue())
    return train, test
