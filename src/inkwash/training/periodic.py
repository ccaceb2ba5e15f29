"""The periodic jobs of a training run, each named for what it does: ``Checkpoints`` (every rank takes
part), and on rank 0 ``Evaluation`` (scores of the EMA model, as log columns), ``SampleGrids`` (a
grid from the EMA weights, the same seeds each time so that the grids show progress) and
``TensorBoard`` (optional scalars and grids). The loop runs each one when ``due``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from inkwash.errors import InkwashError
from inkwash.pictures import sample_grid, save_png
from inkwash.training.distributed import barrier
from inkwash.training.resume import write_training_checkpoint

if TYPE_CHECKING:
    from inkwash.core.schedule import NoiseSchedule
    from inkwash.core.unet import UNetConfig
    from inkwash.data.loading import ImageData
    from inkwash.training.config import TrainConfig
    from inkwash.training.log import TrainingLog
    from inkwash.training.trainer import Trainer

SAMPLES_DIR = "samples"
GRID_IMAGES = 16
GRID_STEPS = 25


def due(every: int | None, step: int, last: bool) -> bool:
    """A job set to run every ``every`` steps (None: never) runs at its multiples and after the last step."""
    return every is not None and (step % every == 0 or last)


class Checkpoints:
    """``RUN/checkpoints/step_NNNNNNNN`` with the weights, the optimizer and the trainer's snapshot,
    and log.csv brought up to date beside it. ``description`` (``resume.run_config``) is each
    checkpoint's config.json but for its step."""

    def __init__(self, run_dir: Path, description: dict, keep_last: int) -> None:
        self.run_dir, self.description, self.keep_last = run_dir, description, keep_last
        self.newest: Path | None = None

    def save(self, trainer: Trainer, log: TrainingLog) -> None:
        """Every rank calls it (the snapshot gathers each rank's random streams); rank 0 writes."""
        state = trainer.snapshot()
        if trainer.world.is_main:
            log.write()
            self.newest = write_training_checkpoint(
                self.run_dir,
                {**self.description, "step": trainer.step},
                trainer.model,
                trainer.ema,
                trainer.optimizer,
                state,
                keep_last=self.keep_last,
            )
        barrier(trainer.world)


class TensorBoard:
    """``--tensorboard``: the loss, the learning rate, the evaluation scores and the sample grids in
    ``RUN/tensorboard``. Switched off, every call does nothing."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InkwashError(
                    "--tensorboard needs the tensorboard package: pip install 'inkwash[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, loss: float, lr: float, scores: dict[str, float]) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        for name, value in scores.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()

    def image(self, step: int, image: Image.Image) -> None:
        if self.writer is not None:
            array = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
            self.writer.add_image("samples", array, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleGrids:
    """``--sample-every``: ``RUN/samples/step_NNNNNNNN.png`` and ``latest.png`` from the EMA weights."""

    def __init__(
        self, config: TrainConfig, run_dir: Path, schedule: NoiseSchedule, unet_config: UNetConfig, board: TensorBoard
    ) -> None:
        self.config, self.run_dir, self.schedule, self.board = config, run_dir, schedule, board
        self.shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
        self.num_classes = unet_config.num_classes

    @torch.no_grad()
    def draw(self, ema: nn.Module, step: int) -> Path:
        """DDIM over 25 trailing steps; one row per class for conditional models."""
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
        self.board.image(step, image)
        return path


class Evaluation:
    """``--eval-every``: score the EMA model against the reference data; the scores become log columns."""

    def __init__(self, config: TrainConfig, schedule: NoiseSchedule, unet_config: UNetConfig, data: ImageData) -> None:
        self.config, self.schedule = config, schedule
        self.shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
        self.num_classes = unet_config.num_classes
        self.class_counts = data.class_counts()
        self.reference = None  # loaded at the first evaluation

    def run(self, ema: nn.Module) -> dict[str, float]:
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
