"""Non-leaky geometric augmentation (Karras et al. 2022, "Elucidating the design space", Sec. 5 and App. F.2).

Each training image may be mirrored, flipped upside down, rotated by a multiple of 90 degrees and shifted by a
few pixels, and the network is told which: it gets the transform as an extra condition, ``augment_labels``
(B, AUGMENT_DIM), embedded like the class label. All zeros means "not augmented", which is what sampling
asks for, so the augmented images teach the network about digits without leaking rotated or shifted digits
into its samples. On a small dataset this is a regularizer against memorizing the training images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# x-flip, y-flip, cos(rotation) - 1, sin(rotation), x shift / width, y shift / height
AUGMENT_DIM = 6
# The largest shift, as a fraction of the image side (EDM's CIFAR-10 pipe shifts by up to 1/8).
MAX_SHIFT = 0.125
TRANSFORMS = ("xflip", "yflip", "rotate", "shift")


def augment(
    images: torch.Tensor, probability: float, generator: torch.Generator, transforms: tuple[str, ...] = TRANSFORMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of square images (B, C, S, S); returns the images and their labels (B, AUGMENT_DIM).

    Each of the four transforms applies to each image on its own with ``probability``: an x-flip, a y-flip, a
    rotation by 90, 180 or 270 degrees (counter-clockwise, chosen uniformly) and a shift by a whole number of
    pixels, up to ``MAX_SHIFT`` of the side in each direction (the border is filled by reflection). They are
    applied in that order. ``transforms`` names those in use (of ``TRANSFORMS``); the others never apply, and
    their labels stay zero. All random draws come from ``generator``, so a seeded run repeats exactly.
    """
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)[0]!r}; choose from {', '.join(TRANSFORMS)}")
    b, _, height, width = images.shape
    if height != width:
        raise ValueError(f"augmentation needs square images, got {height}x{width}")
    device = generator.device

    def chosen(name: str) -> torch.Tensor:  # (B,) whether a transform applies to each image
        drawn = torch.rand(b, generator=generator, device=device) < probability  # drawn either way: one stream
        return drawn & (name in transforms)

    xflip, yflip = chosen("xflip"), chosen("yflip")
    quarter_turns = torch.where(chosen("rotate"), torch.randint(1, 4, (b,), generator=generator, device=device), 0)
    shift_max = max(1, round(MAX_SHIFT * width))
    shifted = chosen("shift")
    shift = torch.randint(-shift_max, shift_max + 1, (2, b), generator=generator, device=device) * shifted  # (2, B)

    out = images
    out = torch.where(_per_image(xflip, out), out.flip(-1), out)
    out = torch.where(_per_image(yflip, out), out.flip(-2), out)
    rotations = [out] + [torch.rot90(out, k, dims=(-2, -1)) for k in (1, 2, 3)]
    out = torch.stack(rotations)[quarter_turns.to(out.device), torch.arange(b, device=out.device)]
    out = _shift(out, shift[0].to(out.device), shift[1].to(out.device), shift_max)

    angle = quarter_turns.to(torch.float32) * (math.pi / 2)
    labels = torch.stack(
        [
            xflip.float(),
            yflip.float(),
            torch.cos(angle) - 1.0,
            torch.sin(angle),
            shift[0].float() / width,
            shift[1].float() / height,
        ],
        dim=1,
    )
    return out, labels.round(decimals=6).to(images.device)  # cos / sin of quarter turns, exactly


def _per_image(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.device)[:, None, None, None]


def _shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int) -> torch.Tensor:
    """Move each image right by dx[i] and down by dy[i] pixels (negative: left / up), reflecting at the border."""
    b, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, C, H + 2 pad, W + 2 pad)
    rows = torch.arange(height, device=images.device)[None] + pad - dy[:, None]  # (B, H)
    cols = torch.arange(width, device=images.device)[None] + pad - dx[:, None]  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
