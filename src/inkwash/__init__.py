"""inkwash: train and sample image diffusion models.

The three-line API::

    import inkwash
    inkwash.train(data="digits", out="runs/x", steps=3000)  # keyword arguments are TrainConfig fields
    pipe = inkwash.load("runs/x")                            # a run folder or one checkpoint
    images = pipe.generate(num_images=16, sampler="DPM++ 2M", steps=20, seed=0)  # uint8 (N, H, W, C)

Everything else stays importable from its module (``inkwash.core``, ``inkwash.sampling``,
``inkwash.training``, ``inkwash.evaluation``). Importing the package loads only the core; the training
loop and the pipeline are imported when first used.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from inkwash.core.schedule import NoiseSchedule
from inkwash.core.unet import UNet
from inkwash.errors import InkwashError
from inkwash.training.config import TrainConfig

if TYPE_CHECKING:
    from inkwash.pipeline import Pipeline
    from inkwash.training.loop import TrainResult

__all__ = ["InkwashError", "NoiseSchedule", "Pipeline", "TrainConfig", "UNet", "load", "train"]


def train(config: TrainConfig | None = None, /, *, show_progress: bool = True, **options: Any) -> TrainResult:
    """Train a model and write its run folder (``inkwash.training.loop.train``).

    ``options`` are ``TrainConfig`` fields (``data``, ``out``, ``steps``, ``preset``, ``class_cond``, ...);
    given with a ``TrainConfig``, they replace its fields. Returns the ``TrainResult`` (the run folder,
    the steps done, the losses and the throughput).
    """
    from inkwash.training.loop import train as train_loop

    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = replace(config, **options)
    return train_loop(config, show_progress=show_progress)


def load(
    path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "auto", precision: str = "fp32"
) -> Pipeline:
    """A ``Pipeline`` for a run folder (its newest complete checkpoint), one checkpoint folder, a diffusers
    ``DDPMPipeline`` / ``DDIMPipeline`` folder or a ``StableDiffusionPipeline`` folder (safetensors weights); its
    ``generate(...)`` samples images (``prompt=``, ``negative_prompt=``, ``width=``, ``height=``, ``emphasis=``
    for Stable Diffusion). ``use_ema`` picks the EMA weights (the default) or the raw ones; ``device`` is auto
    (the GPU when there is one), cpu, cuda or a ``torch.device``; ``precision`` (fp32, fp16, bf16) is the dtype a
    Stable Diffusion folder's weights are held in."""
    from inkwash.pipeline import Pipeline

    return Pipeline.load(path, use_ema=use_ema, device=device, precision=precision)


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from inkwash.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'inkwash' has no attribute {name!r}")
