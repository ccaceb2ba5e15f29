"""Training: the seed's six steps (draw images, a step t and noise; form x_t in closed form; predict
the target; L2 loss) with AdamW, warm-up, clipping and an EMA, made fit for long runs: exact resume,
torchrun DDP, mixed precision, gradient accumulation, non-finite step skipping, class conditioning
with label dropout, and pictures while it runs."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from inkwash.checkpoint import read_config
from inkwash.core.precision import deterministic_mode, precision_context, precision_warning
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.unet import PRESETS, UNet, UNetConfig, count_parameters, preset
from inkwash.data.loading import ImageData, load_data, random_flip
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes
from inkwash.pictures import loss_curve
from inkwash.progress import progress
from inkwash.training.config import TrainConfig
from inkwash.training.distributed import World, barrier, close_world, gather_bytes, init_world
from inkwash.training.hooks import TrainingPictures, make_scaler
from inkwash.training.objectives import diffusion_loss, learning_rate
from inkwash.training.resume import (
    TrainingState,
    check_compatible,
    clean_partial,
    find_resume_checkpoint,
    load_training_checkpoint,
    write_training_checkpoint,
)
from inkwash.training.run_folder import claim_run_folder, new_run_id

__all__ = ["EpochSampler", "TrainConfig", "TrainResult", "diffusion_loss", "make_optimizer", "train"]

LOG_FILE = "log.csv"
LOSS_CURVE_FILE = "loss.png"


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


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW, with the fused single-kernel update where this PyTorch build has it for the device."""
    settings = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    try:
        return torch.optim.AdamW(model.parameters(), **settings, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), **settings)


class EpochSampler:
    """Draws batches without replacement, reshuffling each epoch, from a seeded generator."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order = torch.randperm(size, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        chunks, needed = [], self.batch_size
        while needed:
            if self.position == self.size:
                self.order = torch.randperm(self.size, generator=self.generator)
                self.position = 0
            take = min(needed, self.size - self.position)
            chunks.append(self.order[self.position : self.position + take])
            self.position += take
            needed -= take
        return torch.cat(chunks)


def noise_seed(seed: int, rank: int) -> int:
    """Each rank's own stream for timesteps, noise, flips and label dropout, apart from the data order."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (1 << 63)


def run_config(
    config: TrainConfig, unet_config: UNetConfig, schedule: NoiseSchedule, data: ImageData, step: int, run_id: str
) -> dict:
    return {
        "run_id": run_id,
        "unet": unet_config.to_dict(),
        "schedule": schedule.config.to_dict(),
        "prediction": config.prediction,
        "data": {
            "source": data.source,
            "shape": list(data.shape),
            "num_images": len(data),
            "class_names": data.class_names,
            "class_counts": data.class_counts(),
        },
        "train": asdict(config),
        "step": step,
    }


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


def _model_config(config: TrainConfig, data: ImageData | None) -> UNetConfig:
    overrides: dict = {"image_size": config.image_size} if config.image_size else {}
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    if config.class_cond:
        if data is None or data.labels is None or not data.class_names:
            raise InkwashError(f"--class-cond needs labelled data; {config.data!r} has no class labels")
        overrides["num_classes"] = len(data.class_names)
    try:
        return preset(config.preset, **overrides)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None


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
    device = world.device
    warning = precision_warning(config.precision, device)
    if warning and world.is_main:
        print(warning, file=sys.stderr)
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
    if device.type != "cpu":  # the whole dataset lives on the device: no loader between steps
        labels = data.labels.to(device) if data.labels is not None else None
        data = replace(data, images=data.images.to(device), labels=labels)
    if data.shape != (unet_config.in_channels, unet_config.image_size, unet_config.image_size):
        raise InkwashError(f"data shape {data.shape} does not match the model's input")
    schedule = NoiseSchedule(
        ScheduleConfig(beta_schedule=config.beta_schedule, zero_terminal_snr=config.zero_terminal_snr)
    )
    run_dir = Path(config.out)

    # Three random streams: the data order (shared by all ranks, each taking its slice of a global
    # batch), each rank's noise stream, and each rank's global generator (dropout).
    torch.manual_seed(config.seed + world.rank)
    data_rng = torch.Generator().manual_seed(config.seed)
    noise_rng = torch.Generator(device=device).manual_seed(noise_seed(config.seed, world.rank))
    model = UNet(unet_config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2))
    scaler = make_scaler(config.precision, device)
    batches = EpochSampler(len(data), config.batch_size * world.size, data_rng)
    step, counters = 0, {"nonfinite_total": 0, "nonfinite_streak": 0}
    run_id = new_run_id()
    wanted = run_config(config, unet_config, schedule, data, 0, run_id)

    if config.resume and resume_from is None and world.is_main:
        print(f"no checkpoint in {run_dir} yet; starting from step 0")
    log_rows: list[dict] = []
    if resume_from is not None:
        saved = read_config(resume_from)
        check_compatible(saved, wanted, resume_from)
        run_id = saved.get("run_id") or run_id  # the run goes on under its own identity
        if saved.get("data", {}).get("num_images") != len(data):
            raise InkwashError(
                f"cannot resume from {resume_from}: it was trained on {saved.get('data', {}).get('num_images')} "
                f"images, this run has {len(data)}"
            )
        state = load_training_checkpoint(resume_from, model, ema, optimizer)
        for group in optimizer.param_groups:  # the optimizer's settings are this run's, not the checkpoint's
            group.update(weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2))
        step = state.step
        _restore_state(state, world, data_rng, noise_rng, batches, scaler)
        counters.update(state.counters)
        log_rows = [row for row in _read_log(run_dir / LOG_FILE) if int(row["step"]) <= step]
        if world.is_main:
            print(f"resumed from {resume_from} at step {step}")

    train_model: nn.Module = model
    if world.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)
    pictures = TrainingPictures(config, run_dir, schedule, data, unet_config) if world.is_main else None

    per_step_images = config.batch_size * config.grad_accum * world.size
    bar = progress(total=config.steps, initial=step, desc="training", unit="step", disable=not show_progress)
    start = time.perf_counter()
    start_step = step
    interval_start, interval_step, interval_losses = start, step, []
    log_written = start
    first_loss = final_loss = float("nan")
    total_steps = config.steps
    interrupted: str | None = None
    last_checkpoint: Path | None = None
    model.train()
    with _StopSignals() as signals:
        while step < total_steps:
            lr = learning_rate(
                step,
                peak=config.lr,
                warmup_steps=config.warmup_steps,
                total_steps=total_steps,  # a time-limited run decays to zero at its estimated last step
                schedule=config.lr_schedule,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value = _accumulate(config, train_model, schedule, data, batches, noise_rng, scaler, world, device)
            # One collective per step carries the loss, the non-finite flag and the stop request, so the
            # ranks always agree on skipping and stopping.
            local_bad = not math.isfinite(loss_value)
            wants_stop = signals.received is not None or (stop is not None and stop(step + 1))
            mean_loss, any_bad, any_stop = _step_consensus(world, loss_value, local_bad, wants_stop)
            if not any_bad:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                any_bad = not bool(torch.isfinite(grad_norm))
            if any_bad:
                optimizer.zero_grad(set_to_none=True)
                counters["nonfinite_total"] += 1
                counters["nonfinite_streak"] += 1
                if scaler is not None:
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                if counters["nonfinite_streak"] >= config.max_nonfinite:
                    raise InkwashError(
                        f"{counters['nonfinite_streak']} non-finite steps in a row at step {step + 1} "
                        f"({counters['nonfinite_total']} in all); lower --lr, or use --precision fp32"
                    )
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                counters["nonfinite_streak"] = 0
            step += 1
            # EMA warm-up: average over roughly the steps seen so far early in training.
            ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            if not any_bad:
                if math.isnan(first_loss):
                    first_loss = mean_loss
                interval_losses.append(mean_loss)
            if config.time_limit is not None and step - start_step >= 10:
                elapsed = time.perf_counter() - start
                estimate = start_step + int((step - start_step) * config.time_limit / elapsed)
                total_steps = min(config.steps, max(step, estimate))
                bar.total = total_steps
            if any_stop:
                interrupted = signals.received or "stop"
                total_steps = step
            last = step == total_steps
            scores = {}
            if pictures is not None and config.eval_every and (step % config.eval_every == 0 or last):
                scores = pictures.evaluate(ema, step)
            if step % config.log_every == 0 or last or scores:
                now = time.perf_counter()
                images_per_sec = (step - interval_step) * per_step_images / max(now - interval_start, 1e-9)
                if interval_losses:
                    final_loss = sum(interval_losses) / len(interval_losses)
                log_rows.append(
                    {
                        "step": step,
                        "loss": f"{final_loss:.6f}",
                        "lr": f"{lr:.6g}",
                        "images_per_sec": f"{images_per_sec:.2f}",
                        "skipped": counters["nonfinite_total"],
                        **{name: f"{value:.6g}" for name, value in scores.items()},
                    }
                )
                if pictures is not None:
                    pictures.log_scalars(step, final_loss, lr, scores)
                bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                interval_start, interval_step, interval_losses = now, step, []
                if world.is_main and now - log_written > 30:  # keep log.csv fresh for people watching it
                    write_log(run_dir / LOG_FILE, log_rows)
                    log_written = now
            bar.update(1)
            if step % config.checkpoint_every == 0 or last:
                state = _capture_state(step, world, data_rng, noise_rng, batches, counters, scaler)
                if world.is_main:
                    write_log(run_dir / LOG_FILE, log_rows)
                    log_written = time.perf_counter()
                    last_checkpoint = write_training_checkpoint(
                        run_dir,
                        run_config(config, unet_config, schedule, data, step, run_id),
                        model,
                        ema,
                        optimizer,
                        state,
                        keep_last=config.keep_last,
                    )
                barrier(world)
            if pictures is not None and config.sample_every and (step % config.sample_every == 0 or last):
                pictures.sample_grid(ema, step)
    bar.close()
    seconds = time.perf_counter() - start
    if pictures is not None:
        loss_curve(run_dir / LOG_FILE, run_dir / LOSS_CURVE_FILE)
        pictures.close()
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        first_loss=first_loss,
        final_loss=final_loss,
        images_per_sec=(step - start_step) * per_step_images / max(seconds, 1e-9),
        seconds=seconds,
        num_parameters=count_parameters(model),
        skipped_steps=counters["nonfinite_total"],
        interrupted=interrupted,
        checkpoint=last_checkpoint,
    )


def _accumulate(
    config: TrainConfig,
    train_model: nn.Module,
    schedule: NoiseSchedule,
    data: ImageData,
    batches: EpochSampler,
    noise_rng: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    world: World,
    device: torch.device,
) -> float:
    """Forward and backward over ``grad_accum`` micro-batches; returns the mean loss (may be non-finite)."""
    total = 0.0
    for micro in range(config.grad_accum):
        index = batches.next()[world.rank * config.batch_size : (world.rank + 1) * config.batch_size]
        x0 = data.images[index.to(data.images.device)]  # (B, C, H, W)
        if config.hflip:
            x0 = random_flip(x0, noise_rng)
        if config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = None
        if config.class_cond:
            labels = data.labels[index.to(data.labels.device)]  # (B,)
            if config.cond_drop > 0:
                # Label dropout (Ho & Salimans 2022): the null class teaches the unconditional model.
                dropped = torch.rand(labels.shape, generator=noise_rng, device=device) < config.cond_drop
                labels = torch.where(dropped, torch.full_like(labels, len(data.class_names)), labels)
        sync = contextlib.nullcontext()
        if world.distributed and micro < config.grad_accum - 1:
            sync = train_model.no_sync()  # all-reduce the gradients once, after the last micro-batch
        with sync:
            with precision_context(config.precision, device):
                loss = diffusion_loss(
                    train_model,
                    schedule,
                    x0,
                    noise_rng,
                    config.prediction,
                    labels=labels,
                    min_snr_gamma=config.min_snr_gamma,
                    input_perturbation=config.input_perturbation,
                )
            scaled = loss / config.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += float(loss.detach())
    return total / config.grad_accum


def _step_consensus(world: World, loss: float, bad: bool, wants_stop: bool) -> tuple[float, bool, bool]:
    if not world.distributed:
        return loss, bad, wants_stop
    import torch.distributed as dist

    stats = torch.tensor(
        [0.0 if bad else loss, float(bad), float(wants_stop)], dtype=torch.float64, device=world.device
    )
    dist.all_reduce(stats)
    good = world.size - stats[1].item()
    return stats[0].item() / max(good, 1), stats[1].item() > 0, stats[2].item() > 0


def _capture_state(
    step: int,
    world: World,
    data_rng: torch.Generator,
    noise_rng: torch.Generator,
    batches: EpochSampler,
    counters: dict,
    scaler: torch.amp.GradScaler | None,
) -> TrainingState:
    cuda = world.device.type == "cuda"
    return TrainingState(
        step=step,
        data_rng=data_rng.get_state(),
        order=batches.order.clone(),
        position=batches.position,
        noise_rng=gather_bytes(world, noise_rng.get_state()),
        torch_rng=gather_bytes(world, torch.get_rng_state()),
        cuda_rng=gather_bytes(world, torch.cuda.get_rng_state(world.device)) if cuda else [],
        counters=dict(counters),
        scaler=scaler.state_dict() if scaler is not None else None,
    )


def _restore_state(
    state: TrainingState,
    world: World,
    data_rng: torch.Generator,
    noise_rng: torch.Generator,
    batches: EpochSampler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    data_rng.set_state(state.data_rng)
    if len(state.order) != batches.size:
        raise InkwashError("cannot resume: the saved data order is for a different number of images")
    batches.order, batches.position = state.order, state.position
    if state.world_size == world.size:
        noise_rng.set_state(state.noise_rng[world.rank])
        torch.set_rng_state(state.torch_rng[world.rank])
        if state.cuda_rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(state.cuda_rng[world.rank], world.device)
    elif world.is_main:
        # Another process count: the data order carries on exactly, the per-rank noise streams cannot.
        print(f"note: checkpoint from {state.world_size} process(es), now {world.size}; noise streams restart")
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_log(path: Path, rows: list[dict]) -> None:
    fieldnames: list[str] = []
    for row in rows:
        fieldnames.extend(key for key in row if key not in fieldnames)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or ["step", "loss"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
