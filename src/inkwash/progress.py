"""Progress bars with a rate and an ETA (tqdm), written to stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(
    iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs
) -> tqdm:
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
        **kwargs,
    )


def close_bars() -> None:
    """Finish every open bar on its own line, so that an error printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
