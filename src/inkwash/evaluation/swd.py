"""Sliced Wasserstein distance between image sets on Laplacian-pyramid patches (Karras et al. 2018,
"Progressive growing of GANs", Sec. 5 and its appendix on the metric). It needs no feature network.

Each image is split into a Laplacian pyramid (Burt & Adelson 1983): band-pass levels at full, half,
quarter ... resolution, the coarsest holding the remaining low-pass image. From each level, 7x7
patches at random positions become descriptors; each colour channel of a set's descriptors is
normalised to zero mean and unit variance, and the two sets are compared with the sliced Wasserstein
distance. A small distance at a fine level means similar edges and strokes; at a coarse level,
similar large-scale shapes. Values are reported x 1e3, as in the paper.

Two departures from the paper's code, both for images this small: levels stop at the coarsest side
that still holds a 7x7 patch (16 and 8 for 16x16 images, where the paper stops at 16 pixels), and the
distance is ``distances.sliced_wasserstein`` (the 2-Wasserstein distance of each projection, which
handles sets of different sizes) rather than the mean absolute difference of equally many sorted values.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from inkwash.evaluation.distances import sliced_wasserstein

PATCH = 7
SCALE = 1e3
# The 5-tap binomial filter of Burt & Adelson's pyramid, applied separably.
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def _blur(images: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial blur with reflected borders, per channel."""
    channels = images.shape[1]
    kernel = _BINOMIAL.to(images.dtype)
    horizontal = kernel.reshape(1, 1, 1, 5).expand(channels, 1, 1, 5)
    vertical = kernel.reshape(1, 1, 5, 1).expand(channels, 1, 5, 1)
    images = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="reflect"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, 2, 2), mode="reflect"), vertical, groups=channels)


def _upsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero insertion to ``size``, then the blur with gain 4 to restore the mean (Burt & Adelson's EXPAND)."""
    out = images.new_zeros(*images.shape[:2], *size)
    out[..., ::2, ::2] = images
    return 4 * _blur(out)


def laplacian_pyramid(images: torch.Tensor, min_side: int = PATCH) -> list[torch.Tensor]:
    """Levels of (N, C, H, W) images, finest first: band-pass ``G_l - EXPAND(G_{l+1})``, and the
    last level the low-pass ``G_l`` itself. Halving stops before a side falls below ``min_side``."""
    gaussian = [images.to(torch.float64)]
    while min(gaussian[-1].shape[-2:]) // 2 >= min_side:
        gaussian.append(_blur(gaussian[-1])[..., ::2, ::2])
    bands = [fine - _upsample(coarse, fine.shape[-2:]) for fine, coarse in pairwise(gaussian)]
    return [*bands, gaussian[-1]]


def patch_descriptors(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``per_image`` random 7x7 patches of each image, (N * per_image, C, 7, 7)."""
    count, _, height, width = level.shape
    num = count * per_image
    image = torch.arange(count).repeat_interleave(per_image)  # (M,)
    top = torch.randint(height - PATCH + 1, (num,), generator=generator)
    left = torch.randint(width - PATCH + 1, (num,), generator=generator)
    offsets = torch.arange(PATCH)
    rows = (top[:, None] + offsets)[:, :, None]  # (M, 7, 1)
    cols = (left[:, None] + offsets)[:, None, :]  # (M, 1, 7)
    return level[image[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (M, 7, 7, C) -> (M, C, 7, 7)


def normalize_descriptors(descriptors: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance per channel over the whole set (Karras et al.), flattened (M, C*49)."""
    mean = descriptors.mean(dim=(0, 2, 3), keepdim=True)
    std = descriptors.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-12)
    return ((descriptors - mean) / std).flatten(1)


def sliced_wasserstein_pyramid(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    patches_per_image: int = 16,
    num_projections: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """SWD x 1e3 between image sets a (N, C, H, W) and b (M, C, H, W) in [-1, 1], per level and averaged.

    Keys ``swd_<side>px`` for each level (``swd_16px``, ``swd_8px`` for 16x16 images) and ``swd`` for
    their mean. The patch positions and projection directions come from ``seed``.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    if min(a.shape[-2:]) < PATCH:
        raise ValueError(f"SWD needs images of at least {PATCH}x{PATCH} pixels, got {tuple(a.shape[-2:])}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for level_a, level_b in zip(laplacian_pyramid(a), laplacian_pyramid(b), strict=True):
        descriptors_a = normalize_descriptors(patch_descriptors(level_a, patches_per_image, generator))
        descriptors_b = normalize_descriptors(patch_descriptors(level_b, patches_per_image, generator))
        directions = torch.Generator().manual_seed(seed)
        distance = sliced_wasserstein(descriptors_a, descriptors_b, num_projections, generator=directions)
        out[f"swd_{level_a.shape[-1]}px"] = SCALE * distance
    out["swd"] = sum(out.values()) / len(out)
    return out
