"""Which files of a folder are data: the one rule that training data, evaluation references and folders of
samples all follow."""

from __future__ import annotations

import os
from pathlib import Path


def list_files(root: str | Path) -> list[Path]:
    """Every file under ``root``, recursively, sorted by its path relative to ``root``, leaving out hidden
    files and everything inside hidden folders (names starting with "."); symlinked folders are not entered.

    There is no extension filter: whatever Pillow can read is an image, and the loaders skip (and count)
    the rest."""
    root = Path(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        # Pruned in place, so os.walk never descends into .git, .cache and the like.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder, name) for name in names if not name.startswith(".")]
    return sorted((path for path in found if path.is_file()), key=lambda path: path.relative_to(root).as_posix())
