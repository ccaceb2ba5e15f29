"""What a run carries from one step to the next, and the step itself.

A ``Trainer`` holds the model, its EMA, AdamW, the fp16 loss scaler, the step count and the random
streams: the data order (shared by all ranks, each taking its slice of a global batch), each rank's
noise stream (timesteps, noise, flips, label dropout) and each rank's global generator (dropout).
One training step is ``accumulate`` (forward and backward over the micro-batches) and then
``optimizer_step`` (clip and update, or skip a non-finite step); ``snapshot`` and ``restore`` carry
all of it across a restart, bitwise.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from inkwash.core.precision import precision_context
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.unet import UNet, UNetConfig
from inkwash.data.augment import augment
from inkwash.data.loading import ImageData, random_flip
from inkwash.errors import InkwashError
from inkwash.training.config import TrainConfig
from inkwash.training.distributed import World, gather_bytes
from inkwash.training.objectives import diffusion_loss, learning_rate
from inkwash.training.resume import ResumeState, load_training_checkpoint


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW, with the fused single-kernel update where this PyTorch build has it for the device."""
    settings = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    try:
        return torch.optim.AdamW(model.parameters(), **settings, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), **settings)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling (Micikevicius et al. 2018); bf16 has fp32's range."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


def noise_seed(seed: int, rank: int) -> int:
    """Each rank's own stream for timesteps, noise, flips and label dropout, apart from the data order."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (1 << 63)


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


def step_consensus(world: World, loss: float, bad: bool, wants_stop: bool) -> tuple[float, bool, bool]:
    """One collective per step carries the loss, the non-finite flag and the stop request, so the ranks
    always agree on skipping and stopping. Returns the mean of the finite losses and the two flags."""
    if not world.distributed:
        return loss, bad, wants_stop
    import torch.distributed as dist

    stats = torch.tensor(
        [0.0 if bad else loss, float(bad), float(wants_stop)], dtype=torch.float64, device=world.device
    )
    dist.all_reduce(stats)
    good = world.size - stats[1].item()
    return stats[0].item() / max(good, 1), stats[1].item() > 0, stats[2].item() > 0


class Trainer:
    """The state of one rank's training run (see the module docstring), built in a fixed order so
    that a seed gives the same run."""

    def __init__(self, config: TrainConfig, unet_config: UNetConfig, world: World, num_images: int) -> None:
        self.config, self.world = config, world
        device = world.device
        torch.manual_seed(config.seed + world.rank)
        data_rng = torch.Generator().manual_seed(config.seed)
        self.noise_rng = torch.Generator(device=device).manual_seed(noise_seed(config.seed, world.rank))
        model = UNet(unet_config).to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        betas = (config.adam_beta1, config.adam_beta2)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, betas)
        self.scaler = make_scaler(config.precision, device)
        self.batches = EpochSampler(num_images, config.batch_size * world.size, data_rng)
        self.step = 0
        self.counters = {"nonfinite_total": 0, "nonfinite_streak": 0}
        self.train_model: nn.Module = model  # what the forward pass runs: the model, or its DDP / compiled wrapper

    @property
    def skipped_steps(self) -> int:
        return self.counters["nonfinite_total"]

    def wrap(self) -> None:
        """DistributedDataParallel under torchrun, then ``torch.compile`` if asked; after ``restore``."""
        if self.world.distributed:
            device = self.world.device
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)

    def set_learning_rate(self, total_steps: int) -> float:
        config = self.config
        lr = learning_rate(
            self.step,
            peak=config.lr,
            warmup_steps=config.warmup_steps,
            total_steps=total_steps,  # a time-limited run decays to zero at its estimated last step
            schedule=config.lr_schedule,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def accumulate(self, schedule: NoiseSchedule, data: ImageData) -> float:
        """Forward and backward over ``grad_accum`` micro-batches; returns the mean loss (may be non-finite)."""
        config = self.config
        total = 0.0
        for micro in range(config.grad_accum):
            x0, labels, augment_labels = self._micro_batch(data)
            sync = contextlib.nullcontext()
            if self.world.distributed and micro < config.grad_accum - 1:
                sync = self.train_model.no_sync()  # all-reduce the gradients once, after the last micro-batch
            with sync:
                with precision_context(config.precision, self.world.device):
                    loss = diffusion_loss(
                        self.train_model,
                        schedule,
                        x0,
                        self.noise_rng,
                        config.prediction,
                        labels=labels,
                        min_snr_gamma=config.min_snr_gamma,
                        input_perturbation=config.input_perturbation,
                        augment_labels=augment_labels,
                    )
                scaled = loss / config.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach())
        return total / config.grad_accum

    def _micro_batch(self, data: ImageData) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's slice of the next global batch, flipped, augmented and with labels dropped as configured:
        the images, their class labels and their augmentation labels."""
        config, rank = self.config, self.world.rank
        index = self.batches.next()[rank * config.batch_size : (rank + 1) * config.batch_size]
        x0 = data.images[index.to(data.images.device)]  # (B, C, H, W)
        if config.hflip:
            x0 = random_flip(x0, self.noise_rng)
        augment_labels = None
        if config.augment > 0:
            x0, augment_labels = augment(x0, config.augment, self.noise_rng, config.transforms)  # (B, AUGMENT_DIM)
        if config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = None
        if config.class_cond:
            labels = data.labels[index.to(data.labels.device)]  # (B,)
            if config.cond_drop > 0:
                # Label dropout (Ho & Salimans 2022): the null class teaches the unconditional model.
                drop = torch.rand(labels.shape, generator=self.noise_rng, device=self.world.device)
                labels = torch.where(drop < config.cond_drop, torch.full_like(labels, len(data.class_names)), labels)
        return x0, labels, augment_labels

    def optimizer_step(self, bad: bool) -> bool:
        """Unscale, clip and step, unless ``bad`` (a non-finite loss on some rank) or the gradient norm
        says to skip: then drop the gradients and back the fp16 loss scale off. Either way the step
        counts and the EMA follows. Returns whether the weights were updated."""
        config, optimizer, scaler = self.config, self.optimizer, self.scaler
        if not bad:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            bad = not bool(torch.isfinite(grad_norm))
        counters = self.counters
        if bad:
            optimizer.zero_grad(set_to_none=True)
            counters["nonfinite_total"] += 1
            counters["nonfinite_streak"] += 1
            if scaler is not None:
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            if counters["nonfinite_streak"] >= config.max_nonfinite:
                raise InkwashError(
                    f"{counters['nonfinite_streak']} non-finite steps in a row at step {self.step + 1} "
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
        self.step += 1
        # EMA warm-up: average over roughly the steps seen so far early in training.
        ema_update(self.ema, self.model, min(config.ema_decay, (1 + self.step) / (10 + self.step)))
        return not bad

    def snapshot(self) -> ResumeState:
        """Everything but the weights, for ``state.safetensors``. Under DDP every rank must call it:
        each rank's own streams are gathered to all."""
        world, batches = self.world, self.batches
        cuda = world.device.type == "cuda"
        return ResumeState(
            step=self.step,
            data_rng=batches.generator.get_state(),
            order=batches.order.clone(),
            position=batches.position,
            noise_rng=gather_bytes(world, self.noise_rng.get_state()),
            torch_rng=gather_bytes(world, torch.get_rng_state()),
            cuda_rng=gather_bytes(world, torch.cuda.get_rng_state(world.device)) if cuda else [],
            counters=dict(self.counters),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
        )

    def restore(self, checkpoint: Path) -> None:
        """Load a training checkpoint's weights, optimizer and state; its config must match this run's
        (``resume.check_compatible``)."""
        config, world, batches = self.config, self.world, self.batches
        state = load_training_checkpoint(checkpoint, self.model, self.ema, self.optimizer)
        for group in self.optimizer.param_groups:  # the optimizer's settings are this run's, not the checkpoint's
            group.update(weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2))
        self.step = state.step
        batches.generator.set_state(state.data_rng)
        if len(state.order) != batches.size:
            raise InkwashError("cannot resume: the saved data order is for a different number of images")
        batches.order, batches.position = state.order, state.position
        if state.world_size == world.size:
            self.noise_rng.set_state(state.noise_rng[world.rank])
            torch.set_rng_state(state.torch_rng[world.rank])
            if state.cuda_rng and world.device.type == "cuda":
                torch.cuda.set_rng_state(state.cuda_rng[world.rank], world.device)
        elif world.is_main:
            # Another process count: the data order carries on exactly, the per-rank noise streams cannot.
            print(f"note: checkpoint from {state.world_size} process(es), now {world.size}; noise streams restart")
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.counters.update(state.counters)
