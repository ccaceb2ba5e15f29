"""``TrainConfig``: every option of a training run, with its default and its validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from inkwash.core.denoiser import PREDICTIONS
from inkwash.core.precision import PRECISIONS
from inkwash.core.schedule import BETA_SCHEDULES
from inkwash.core.unet import PRESETS
from inkwash.errors import InkwashError
from inkwash.training.objectives import LR_SCHEDULES


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    preset: str = "digits"
    steps: int = 2000
    batch_size: int = 64  # per process and per micro-batch
    lr: float = 1e-3
    image_size: int | None = None  # defaults to the preset's
    dropout: float | None = None  # defaults to the preset's
    seed: int = 0
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept on disk
    resume: str | None = None  # "latest" or a checkpoint / run directory
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    grad_accum: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float = 0.999
    beta_schedule: str = "linear"
    prediction: str = "eps"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); 5 is their choice
    input_perturbation: float = 0.0  # DDPM-IP (Ning et al. 2023): x_t from noise + gamma * xi; 0.1 is theirs
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    log_every: int = 10
    sample_every: int | None = None  # write a sample grid every N steps
    eval_every: int | None = None  # score the EMA model every N steps (inkwash.evaluation.evaluate.periodic_eval)
    eval_metrics: str = "fid,kid"
    eval_samples: int = 500
    eval_reference: str | None = None  # digits, a folder or an .npz; default: --data when it is one of those
    tensorboard: bool = False
    time_limit: float | None = None  # seconds; stop early when reached (used by the demo)
    class_cond: bool = False  # labels from the dataset (a folder's first-level subfolders are classes)
    cond_drop: float = 0.1  # label dropout for classifier-free guidance
    data_dir: str = "data"  # where mnist, fashion-mnist and cifar10 files live
    resize_mode: str = "crop"  # "crop": short side then center crop; "resize": squash to a square
    hflip: bool = False  # random horizontal flips of each training batch
    download: bool = False  # fetch missing standard-dataset files (checksummed)
    overwrite: bool = False  # a fresh run may replace a run already in ``out``
    deterministic: bool = True  # deterministic CUDA kernels, so that resume is exact on a GPU too

    def validate(self) -> None:
        checks = [
            (self.preset in PRESETS, f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.image_size is None or 4 <= self.image_size <= 1024, "--image-size must be in 4..1024"),
            (self.dropout is None or 0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.keep_last >= 1, "--keep-last must be at least 1"),
            (self.warmup_steps >= 0, "warm-up steps must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.grad_clip > 0, "gradient clip must be positive"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (0 <= self.ema_decay < 1, "EMA decay must be in [0, 1)"),
            (0 <= self.adam_beta1 < 1, "--adam-beta1 must be in [0, 1)"),
            (0 <= self.adam_beta2 < 1, "--adam-beta2 must be in [0, 1)"),
            (self.beta_schedule in BETA_SCHEDULES, f"beta schedule must be one of {', '.join(BETA_SCHEDULES)}"),
            (self.time_limit is None or self.time_limit > 0, "time limit must be positive"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {', '.join(PREDICTIONS)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, "--min-snr-gamma must be positive"),
            (
                0 <= self.input_perturbation <= 1 and math.isfinite(self.input_perturbation),
                "--input-perturbation must be in [0, 1]",
            ),
            (0 <= self.cond_drop < 1, "--cond-drop must be in [0, 1)"),
            (self.max_nonfinite >= 1, "--max-nonfinite must be at least 1"),
            (self.sample_every is None or self.sample_every >= 1, "--sample-every must be at least 1"),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be at least 1"),
            (self.eval_samples >= 2, "--eval-samples must be at least 2"),
            (
                not self.zero_terminal_snr or self.prediction != "eps",
                "--zero-terminal-snr needs --prediction v or x0: at zero SNR the noise says nothing about the image",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InkwashError(message)
