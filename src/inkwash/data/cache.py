"""On-disk cache of decoded image folders, so that the second load of a big folder is instant.

One ``.npz`` per (folder, settings) lives in the cache directory. The file holds the decoded pixels
and a key: the SHA-256 of the settings and of every file's relative path, size and mtime. A load
recomputes the key from the folder as it is now and uses the cache only when the two are equal, so
an added, removed, resized or touched file makes the old entry a miss, and the new decode overwrites
it. Arrays are read with ``allow_pickle=False``: the cache is never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL

from inkwash.files import atomic_write_bytes

# Bump when the decoding changes what a folder decodes to, so old entries stop matching.
CACHE_VERSION = 1
CACHE_ENV = "INKWASH_CACHE"


def cache_root() -> Path:
    """The root of every inkwash cache: ``$INKWASH_CACHE`` when set, else ``~/.cache/inkwash``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "inkwash")


def default_cache_dir() -> Path:
    """Decoded folders live in ``datasets/`` under the cache root."""
    return cache_root() / "datasets"


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(cache_dir: Path, root: Path, settings: dict) -> Path:
    """Where the entry for this folder and these settings lives; one file, overwritten when stale."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name)[:40] or "root"
    return cache_dir / f"{name}-{_sha256({'root': str(root.resolve()), **settings})[:16]}.npz"


def cache_key(settings: dict, listing: list[tuple[str, int, int]]) -> str:
    """The key of a folder's contents: settings plus (relative path, size, mtime_ns) of every file."""
    return _sha256({"version": CACHE_VERSION, "pillow": PIL.__version__, "settings": settings, "files": listing})


def read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or None when the entry is missing, stale or torn."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "key" not in archive.files or str(archive["key"]) != key:
                return None
            return {name: archive[name] for name in archive.files if name != "key"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Store ``arrays`` under ``key`` atomically; a cache that cannot be written only costs speed."""
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), **arrays)
    try:
        atomic_write_bytes(path, buffer.getbuffer())  # a view, not a second copy of a big folder
    except OSError as exc:
        print(f"warning: could not write the dataset cache {path}: {exc}", file=sys.stderr)
