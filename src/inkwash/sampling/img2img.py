"""img2img (SDEdit, Meng et al. 2022) and inpainting, for every sampler.

img2img noises the input in closed form to the level that ``strength`` selects and runs the sampler
from there. Inpainting wraps the denoiser (never the network): before each evaluation the pixels
outside the mask are replaced by the init image re-noised to the current sigma, and the denoised
estimate there is the init image itself, so the known region is carried through unchanged.
"""

from __future__ import annotations

import torch

from inkwash.core.denoiser import Denoiser


def strength_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a step schedule that img2img runs: ``int(strength * steps)`` of its steps, as in
    diffusers' img2img pipelines. Strength 0 keeps only the final sigma (no steps)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    run = min(steps, int(strength * steps))
    return sigmas[steps - run :]


class InpaintDenoiser:
    """Keep ``init`` where ``mask`` is 0 and generate where it is 1.

    ``noise`` is the standard normal tensor used to re-noise the known region: x_known = init +
    sigma * noise. Using the same tensor as the sampler's initial noise keeps a deterministic
    sampler's state and the known region consistent at every step.
    """

    def __init__(self, denoiser: Denoiser, init: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> None:
        self.denoiser, self.init, self.mask, self.noise = denoiser, init, mask, noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        scale = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
        known = self.init + scale * self.noise  # (B, C, H, W)
        mixed = self.mask * x + (1 - self.mask) * known
        return self.mask * self.denoiser(mixed, sigma, cond) + (1 - self.mask) * self.init

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Put the known pixels back exactly."""
        return self.mask * x + (1 - self.mask) * self.init
