"""Training: the seed's six steps (draw images, a step t and noise; form x_t in closed form;
predict the noise; L2 loss), with AdamW, warm-up, gradient clipping and an EMA of the weights."""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_bytes, save_checkpoint
from .data import ImageData, load_data
from .denoiser import PREDICTIONS
from .errors import InkwashError
from .pictures import loss_curve
from .progress import progress
from .schedule import BETA_SCHEDULES, NoiseSchedule, ScheduleConfig
from .unet import PRESETS, UNet, count_parameters, preset

LOG_FILE = "log.csv"
LOSS_CURVE_FILE = "loss.png"


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    preset: str = "digits"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    image_size: int | None = None  # defaults to the preset's
    seed: int = 0
    checkpoint_every: int = 500
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    beta_schedule: str = "linear"
    prediction: str = "eps"
    zero_terminal_snr: bool = False
    log_every: int = 10
    time_limit: float | None = None  # seconds; stop early when reached (used by the demo)
    class_cond: bool = False  # labels from the dataset (a folder's first-level subfolders are classes)
    data_dir: str = "data"  # where mnist, fashion-mnist and cifar10 files live
    resize_mode: str = "crop"  # "crop": short side then center crop; "resize": squash to a square
    hflip: bool = False  # random horizontal flips of each training batch
    download: bool = False  # fetch missing standard-dataset files (checksummed)

    def validate(self) -> None:
        checks = [
            (self.preset in PRESETS, f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.image_size is None or 4 <= self.image_size <= 1024, "--image-size must be in 4..1024"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.warmup_steps >= 0, "warm-up steps must be >= 0"),
            (self.grad_clip > 0, "gradient clip must be positive"),
            (0 <= self.ema_decay < 1, "EMA decay must be in [0, 1)"),
            (self.beta_schedule in BETA_SCHEDULES, f"beta schedule must be one of {', '.join(BETA_SCHEDULES)}"),
            (self.time_limit is None or self.time_limit > 0, "time limit must be positive"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {', '.join(PREDICTIONS)}"),
            (
                not self.zero_terminal_snr or self.prediction != "eps",
                "--zero-terminal-snr needs --prediction v or x0: at zero SNR the noise says nothing about the image",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InkwashError(message)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    images_per_sec: float
    seconds: float
    num_parameters: int


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        ema_params = list(ema.parameters())
        model_params = list(model.parameters())
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, with the fused single-kernel update where this PyTorch build has it for the device."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
) -> torch.Tensor:
    """Steps 2-6 of the seed: t uniform over the T steps, Gaussian noise, x_t in closed form,
    and the mean squared error between the network's output and its target: the true noise
    (Ho et al. 2020, Alg. 1), the clean image, or v."""
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator)  # (B,)
    noise = torch.randn(x0.shape, generator=generator)  # (B, C, H, W)
    x_t = schedule.q_sample(x0, t, noise)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)
        alpha_bar = schedule.alpha_bar[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    return F.mse_loss(model(x_t, t.float()), target)


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


def run_config(config: TrainConfig, unet_config, schedule: NoiseSchedule, data: ImageData, step: int) -> dict:
    return {
        "unet": unet_config.to_dict(),
        "schedule": schedule.config.to_dict(),
        "prediction": config.prediction,
        "data": {
            "source": data.source,
            "shape": list(data.shape),
            "num_images": len(data),
            "class_names": data.class_names,
        },
        "train": asdict(config),
        "step": step,
    }


def train(config: TrainConfig, data: ImageData | None = None, show_progress: bool = True) -> TrainResult:
    """Train a UNet on ``config.data`` and write checkpoints, the CSV log and the loss curve."""
    config.validate()
    overrides = {"image_size": config.image_size} if config.image_size else {}
    try:
        unet_config = preset(config.preset, **overrides)
    except ValueError as exc:
        raise InkwashError(str(exc)) from None
    if data is None:
        data = load_data(
            config.data,
            unet_config.in_channels,
            unet_config.image_size,
            show_progress,
            class_cond=config.class_cond,
            resize_mode=config.resize_mode,
            data_dir=config.data_dir,
            download=config.download,
        )
    if data.shape != (unet_config.in_channels, unet_config.image_size, unet_config.image_size):
        raise InkwashError(f"data shape {data.shape} does not match the model's input")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = NoiseSchedule(
        ScheduleConfig(beta_schedule=config.beta_schedule, zero_terminal_snr=config.zero_terminal_snr)
    )
    model = UNet(unet_config)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    batches = EpochSampler(len(data), config.batch_size, generator)

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_rows: list[dict] = []
    bar = progress(total=config.steps, desc="training", unit="step", disable=not show_progress)
    start = time.perf_counter()
    interval_start, interval_losses = start, []
    first_loss = final_loss = float("nan")
    total_steps = config.steps
    step = 0
    model.train()
    while step < total_steps:
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(model, schedule, data.images[batches.next()], generator, config.prediction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        # EMA warm-up: average over roughly the steps seen so far early in training.
        ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))

        value = loss.item()
        if not math.isfinite(value):
            raise InkwashError(f"loss became {value} at step {step}; lower --lr")
        if step == 1:
            first_loss = value
        interval_losses.append(value)
        if config.time_limit is not None and step >= 10:
            # Re-estimate the reachable step count from the running rate, within --steps.
            elapsed = time.perf_counter() - start
            total_steps = min(config.steps, max(step, int(step * config.time_limit / elapsed)))
            bar.total = total_steps
        if step % config.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            images_per_sec = len(interval_losses) * config.batch_size / max(now - interval_start, 1e-9)
            final_loss = sum(interval_losses) / len(interval_losses)
            log_rows.append(
                {
                    "step": step,
                    "loss": f"{final_loss:.6f}",
                    "lr": f"{lr:.6g}",
                    "images_per_sec": f"{images_per_sec:.2f}",
                }
            )
            bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{images_per_sec:.0f}")
            interval_start, interval_losses = now, []
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == total_steps:
            write_log(run_dir / LOG_FILE, log_rows)
            save_checkpoint(run_dir, run_config(config, unet_config, schedule, data, step), model, ema, optimizer)
    bar.close()
    seconds = time.perf_counter() - start
    loss_curve(run_dir / LOG_FILE, run_dir / LOSS_CURVE_FILE)
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        first_loss=first_loss,
        final_loss=final_loss,
        images_per_sec=step * config.batch_size / seconds,
        seconds=seconds,
        num_parameters=count_parameters(model),
    )


def write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "loss", "lr", "images_per_sec"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
