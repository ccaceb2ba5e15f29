"""The trainer's helpers: the fp16 loss scaler, and what it shows while it
runs (sample grids from the EMA weights, TensorBoard scalars)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from inkwash.errors import InkwashError
from inkwash.pictures import sample_grid, save_png

if TYPE_CHECKING:
    from inkwash.core.schedule import NoiseSchedule
    from inkwash.core.unet import UNetConfig
    from inkwash.data.loading import ImageData
    from inkwash.training.loop import TrainConfig

SAMPLES_DIR = "samples"
GRID_IMAGES = 16
GRID_STEPS = 25


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling (Micikevicius et al. 2018); bf16 has fp32's range."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


class TrainingPictures:
    """Rank 0's view of a run: a sample grid from the EMA weights every ``--sample-every`` steps (the
    same seeds each time, so the grids show progress) and optional TensorBoard scalars."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        schedule: NoiseSchedule,
        data: ImageData,
        unet_config: UNetConfig,
    ) -> None:
        self.config, self.run_dir, self.schedule = config, run_dir, schedule
        self.shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
        self.num_classes = unet_config.num_classes
        self.class_counts = data.class_counts()
        self.writer = None
        self.reference = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InkwashError(
                    "--tensorboard needs the tensorboard package: pip install 'inkwash[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def evaluate(self, ema: nn.Module, step: int) -> dict[str, float]:
        """Score the EMA model against the reference data (``--eval-every``); the scores become log columns."""
        from inkwash.core.denoiser import ModelDenoiser
        from inkwash.evaluation.evaluate import class_prior_labels, periodic_eval
        from inkwash.evaluation.reference import load_reference

        config = self.config
        if self.reference is None:
            spec = config.eval_reference or config.data
            if spec in ("mnist", "fashion-mnist", "cifar10"):
                raise InkwashError(f"--eval-every: give --eval-reference (a folder or an .npz) for {spec}")
            self.reference = load_reference(spec, self.shape)
        metrics = [name.strip() for name in config.eval_metrics.split(",") if name.strip()]
        denoiser = ModelDenoiser(ema, self.schedule, config.prediction)
        labels = None
        if self.num_classes > 0:  # a class-conditional model is scored on labels in the class proportions
            labels = class_prior_labels(self.num_classes, self.class_counts, config.eval_samples, config.seed)
        return periodic_eval(
            denoiser, self.shape, self.reference, metrics, config.eval_samples, seed=config.seed, labels=labels
        )

    def log_scalars(self, step: int, loss: float, lr: float, extra: dict[str, float] | None = None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        for name, value in (extra or {}).items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module, step: int) -> Path:
        """DDIM over 25 trailing steps from the EMA weights; one row per class for conditional models."""
        from inkwash.core.denoiser import ModelDenoiser
        from inkwash.core.sigmas import build_sigmas
        from inkwash.sampling.generate import generate

        device = next(ema.parameters()).device
        denoiser = ModelDenoiser(ema, self.schedule, self.config.prediction)
        labels = None
        count, nrow = GRID_IMAGES, None
        if self.num_classes:
            per_class = 8
            count, nrow = per_class * self.num_classes, per_class
            labels = torch.arange(self.num_classes).repeat_interleave(per_class).to(device)
        result = generate(
            denoiser,
            self.shape,
            build_sigmas(self.schedule, GRID_STEPS, "trailing"),
            sampler="ddim",
            num_images=count,
            batch_size=count,
            seed=self.config.seed,
            device=device,
            show_progress=False,
            labels=labels,
            clip_denoised=True,
        )
        path = self.run_dir / SAMPLES_DIR / f"step_{step:08d}.png"
        image = sample_grid(result.images, nrow=nrow)
        save_png(image, path)
        save_png(image, self.run_dir / SAMPLES_DIR / "latest.png")
        if self.writer is not None:
            array = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)
            self.writer.add_image("samples", array, step)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
