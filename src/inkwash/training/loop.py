"""Training: the seed's six steps (draw images, a step t and noise; form x_t in closed form; predict
the target; L2 loss) with AdamW, warm-up, clipping and an EMA, made fit for long runs: exact resume,
torchrun DDP, mixed precision, gradient accumulation, non-finite step skipping, class conditioning
with label dropout, and pictures while it runs.

``_train`` reads as a run goes: build the ``Trainer`` (trainer.py: the model, EMA, optimizer and
random streams), resume it if asked (resume.py), then step it, writing the log (log.py) and running
the periodic jobs (periodic.py: checkpoints, evaluation, sample grids, TensorBoard) when due.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from inkwash.checkpoint import read_config
from inkwash.core.precision import deterministic_mode, precision_warning, resolve_precision
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.unet import PRESETS, UNetConfig, count_parameters, preset
from inkwash.data.augment import AUGMENT_DIM
from inkwash.data.loading import ImageData, load_data
from inkwash.errors import InkwashError
from inkwash.pictures import loss_curve
from inkwash.progress import progress
from inkwash.training.config import TrainConfig
from inkwash.training.distributed import World, barrier, close_world, init_world
from inkwash.training.log import LOG_FILE, LOSS_CURVE_FILE, TrainingLog
from inkwash.training.objectives import diffusion_loss
from inkwash.training.periodic import Checkpoints, Evaluation, SampleGrids, TensorBoard, due
from inkwash.training.resume import check_compatible, clean_partial, find_resume_checkpoint, run_config
from inkwash.training.run_folder import claim_run_folder, new_run_id
from inkwash.training.trainer import EpochSampler, Trainer, ema_update, make_optimizer, noise_seed, step_consensus

__all__ = [
    "LOSS_CURVE_FILE",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "diffusion_loss",
    "ema_update",
    "make_optimizer",
    "noise_seed",
    "run_config",
    "train",
]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    images_per_sec: float
    seconds: float
    num_parameters: int
    skipped_steps: int = 0
    interrupted: str | None = None  # the signal that stopped the run, if any
    checkpoint: Path | None = None  # the newest checkpoint written


def train(
    config: TrainConfig,
    data: ImageData | None = None,
    show_progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train a UNet on ``config.data``; write checkpoints, the CSV log and the pictures to ``config.out``.

    Under torchrun this is one rank of a DistributedDataParallel run. ``stop(step)`` returning true
    ends the run after that step with a checkpoint, as SIGINT / SIGTERM do.
    """
    config.validate()
    try:
        world = init_world(config.device)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None
    try:
        run_dir = Path(config.out)
        resume_from = find_resume_checkpoint(config.resume, run_dir) if config.resume else None
        # Rank 0 owns the folder for the whole run: no second process may write checkpoints into it,
        # and a fresh run never mixes its checkpoints with an older run's (see run_folder.py).
        lock = (
            claim_run_folder(run_dir, resume_from, config.resume is not None, config.overwrite)
            if world.is_main
            else None
        )
        try:
            if lock is not None:
                clean_partial(run_dir)  # under the lock, whatever is half-written here is a dead writer's
            barrier(world)
            with deterministic_mode(config.deterministic, world.device):
                return _train(config, data, show_progress and world.is_main, stop, world, resume_from)
        finally:
            if lock is not None:
                lock.release()
    finally:
        close_world(world)


def _train(
    config: TrainConfig,
    data: ImageData | None,
    show_progress: bool,
    stop: Callable[[int], bool] | None,
    world: World,
    resume_from: Path | None,
) -> TrainResult:
    config = replace(config, precision=resolve_precision(config.precision, world.device))  # what auto picked here
    warning = precision_warning(config.precision, world.device)
    if warning and world.is_main:
        print(warning, file=sys.stderr)
    data, unet_config = _prepare_data(config, data, show_progress, world)
    schedule = NoiseSchedule(
        ScheduleConfig(beta_schedule=config.beta_schedule, zero_terminal_snr=config.zero_terminal_snr)
    )
    run_dir = Path(config.out)
    trainer = Trainer(config, unet_config, world, len(data))
    description = run_config(config, unet_config, schedule, data, 0, new_run_id())
    log = TrainingLog(run_dir / LOG_FILE, config.batch_size * config.grad_accum * world.size, writes=world.is_main)
    if config.resume and resume_from is None and world.is_main:
        print(f"no checkpoint in {run_dir} yet; starting from step 0")
    if resume_from is not None:
        _resume(trainer, log, description, resume_from)
    trainer.wrap()
    checkpoints = Checkpoints(run_dir, description, config.keep_last)
    board = TensorBoard(run_dir, enabled=config.tensorboard and world.is_main)
    grids = SampleGrids(config, run_dir, schedule, unet_config, board) if world.is_main else None
    evaluation = Evaluation(config, schedule, unet_config, data) if world.is_main else None

    bar = progress(total=config.steps, initial=trainer.step, desc="training", unit="step", disable=not show_progress)
    start, start_step, total_steps, interrupted = time.perf_counter(), trainer.step, config.steps, None
    log.start(start_step)
    trainer.model.train()
    with _StopSignals() as signals:
        while trainer.step < total_steps:
            lr = trainer.set_learning_rate(total_steps)
            loss = trainer.accumulate(schedule, data)
            wants_stop = signals.received is not None or (stop is not None and stop(trainer.step + 1))
            mean_loss, any_bad, any_stop = step_consensus(world, loss, not math.isfinite(loss), wants_stop)
            if trainer.optimizer_step(any_bad):
                log.add_loss(mean_loss)
            step = trainer.step
            if config.time_limit is not None and step - start_step >= 10:
                total_steps = bar.total = _time_limited_steps(config, start_step, step, time.perf_counter() - start)
            if any_stop:
                interrupted, total_steps = signals.received or "stop", step
            last = step == total_steps
            # The periodic jobs, in an order that matters: the scores are columns of the log row, and
            # a checkpoint writes the log up to its own step.
            scores = {}
            if evaluation is not None and due(config.eval_every, step, last):
                scores = evaluation.run(trainer.ema)
            if due(config.log_every, step, last) or scores:
                images_per_sec = log.add_row(step, lr, trainer.skipped_steps, scores)
                board.scalars(step, log.final_loss, lr, scores)
                bar.set_postfix(loss=f"{log.final_loss:.4f}", img_s=f"{images_per_sec:.0f}")
            bar.update(1)
            if due(config.checkpoint_every, step, last):
                checkpoints.save(trainer, log)
            if grids is not None and due(config.sample_every, step, last):
                grids.draw(trainer.ema, step)
    bar.close()
    seconds = time.perf_counter() - start
    if world.is_main:
        loss_curve(run_dir / LOG_FILE, run_dir / LOSS_CURVE_FILE)
        board.close()
    return TrainResult(
        run_dir=run_dir,
        steps=trainer.step,
        first_loss=log.first_loss,
        final_loss=log.final_loss,
        images_per_sec=(trainer.step - start_step) * log.images_per_step / max(seconds, 1e-9),
        seconds=seconds,
        num_parameters=count_parameters(trainer.model),
        skipped_steps=trainer.skipped_steps,
        interrupted=interrupted,
        checkpoint=checkpoints.newest,
    )


def _prepare_data(
    config: TrainConfig, data: ImageData | None, show_progress: bool, world: World
) -> tuple[ImageData, UNetConfig]:
    """The training images (loaded unless given), on the device, and the model that fits them."""
    if data is None:
        probe = preset(config.preset) if config.preset in PRESETS else None
        size = config.image_size or (probe.image_size if probe else 16)
        data = load_data(
            config.data,
            probe.in_channels if probe else 1,
            size,
            show_progress,
            class_cond=config.class_cond,
            resize_mode=config.resize_mode,
            data_dir=config.data_dir,
            download=config.download,
        )
    unet_config = _model_config(config, data)
    device = world.device
    if device.type != "cpu":  # the whole dataset lives on the device: no loader between steps
        labels = data.labels.to(device) if data.labels is not None else None
        data = replace(data, images=data.images.to(device), labels=labels)
    if data.shape != (unet_config.in_channels, unet_config.image_size, unet_config.image_size):
        raise InkwashError(f"data shape {data.shape} does not match the model's input")
    return data, unet_config


def _model_config(config: TrainConfig, data: ImageData | None) -> UNetConfig:
    overrides: dict = {"image_size": config.image_size} if config.image_size else {}
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    if config.base_channels is not None:
        overrides["base_channels"] = config.base_channels
    if config.patch_size is not None:
        overrides["patch_size"] = config.patch_size
    if config.augment > 0:
        overrides["augment_dim"] = AUGMENT_DIM
    if config.class_cond:
        if data is None or data.labels is None or not data.class_names:
            raise InkwashError(f"--class-cond needs labelled data; {config.data!r} has no class labels")
        overrides["num_classes"] = len(data.class_names)
    try:
        return preset(config.preset, **overrides)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None


def _resume(trainer: Trainer, log: TrainingLog, description: dict, checkpoint: Path) -> None:
    """Continue from ``checkpoint``: the same model on the same data, under the run's own identity."""
    saved = read_config(checkpoint)
    check_compatible(saved, description, checkpoint)
    description["run_id"] = saved.get("run_id") or description["run_id"]
    trainer.restore(checkpoint)
    log.resume(trainer.step)
    if trainer.world.is_main:
        print(f"resumed from {checkpoint} at step {trainer.step}")


def _time_limited_steps(config: TrainConfig, start_step: int, step: int, elapsed: float) -> int:
    """The last step of a ``--time-limit`` run, estimated from the pace so far."""
    estimate = start_step + int((step - start_step) * config.time_limit / elapsed)
    return min(config.steps, max(step, estimate))


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
