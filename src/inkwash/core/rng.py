"""Per-sample random streams: image i depends only on its own seed (EDM's
``StackedRandomGenerator``), whatever the batch size or the number of processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_seeds(seed: int, count: int, start: int = 0) -> list[int]:
    """The seeds of images start .. start+count-1 of a run with the given base seed."""
    return [seed + i for i in range(start, start + count)]


class SampleRNG:
    """One torch.Generator per sample; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) % (1 << 63))
            self.generators.append(generator)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(seeds), *shape) standard normal draws."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype)
