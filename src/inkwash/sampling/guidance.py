"""Classifier-free guidance (Ho & Salimans 2022), as a wrapper around the denoiser, never the network.

Class labels reach the denoiser through the samplers' ``cond`` argument, as a (B,) integer tensor.
The "no class" token is the explicit index ``null_label`` (``UNetConfig.num_classes``), the label the
trainer's label dropout substitutes, so conditional and unconditional rows can share one batch. A text-
conditional model's ``cond`` is instead a (B, L, D) tensor of prompt embeddings, and its ``null_label`` the
(1, L, D) embedding of the negative (or empty) prompt.
"""

from __future__ import annotations

import torch

from inkwash.core.denoiser import Denoiser


class GuidedDenoiser:
    """``D_cfg(x, s, c) = D(x, s, null) + w * (D(x, s, c) - D(x, s, null))`` (Ho & Salimans 2022, Eq. 6,
    written for the denoised estimate; it is the same combination as on epsilon, since x0 = x - sigma * eps
    is affine in eps with the coefficients summing to one).

    For w other than 0 and 1 both terms come from one network call on the doubled batch ``[x, x]`` with
    labels ``[c, null]``: each image costs two network evaluations. w = 1 is the conditional denoiser
    and w = 0 the unconditional one, each a single evaluation. Without labels (``cond`` None) every w
    gives the unconditional denoiser.
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int | torch.Tensor) -> None:
        if not scale >= 0.0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.denoiser, self.scale = denoiser, float(scale)
        self.null_label = null_label if isinstance(null_label, torch.Tensor) else int(null_label)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None or self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        if isinstance(self.null_label, torch.Tensor):  # prompt embeddings: (1, L, D) -> (B, L, D)
            null = self.null_label.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
        else:
            null = torch.full_like(cond, self.null_label)  # (B,)
        if self.scale == 0.0:
            return self.denoiser(x, sigma, null)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), sigma.repeat(2), torch.cat([cond, null]))  # (2B, C, H, W)
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
