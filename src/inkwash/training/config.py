"""``TrainConfig``: every option of a training run, with its default, its help and its checks.

``inkwash train`` builds its flags and reads ``--config`` files from these fields (see inkwash.options).
"""

from __future__ import annotations

from dataclasses import dataclass

from inkwash.core.denoiser import PREDICTIONS
from inkwash.core.precision import PRECISION_CHOICES
from inkwash.core.schedule import BETA_SCHEDULES
from inkwash.core.unet import PRESETS
from inkwash.data.augment import TRANSFORMS
from inkwash.errors import InkwashError
from inkwash.options import check_options, option
from inkwash.training.objectives import LR_SCHEDULES

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # data
    data: str = option(
        "digits",
        "a dataset name, or a folder of images (searched recursively)",
        required=True,
        metavar="digits|mnist|fashion-mnist|cifar10|FOLDER",
    )
    data_dir: str = option("data", "where mnist, fashion-mnist and cifar10 files live")
    download: bool = option(False, "download missing mnist/fashion-mnist/cifar10 files (checksummed)")
    class_cond: bool = option(False, "use class labels (a folder's first-level subfolders are classes)")
    cond_drop: float = option(
        0.1,
        "label dropout for classifier-free guidance, with --class-cond",
        minimum=0,
        exclusive_maximum=1,
    )
    resize_mode: str = option(
        "crop",
        "crop: resize the short side, then center-crop; resize: squash to a square",
        choices=("crop", "resize"),
    )
    hflip: bool = option(False, "random horizontal flips of the training images")
    augment: float = option(
        0.0,
        "non-leaky augmentation (Karras et al. 2022): each transform of --augment-transforms (an x-flip, a y-flip, "
        "a quarter turn, a shift of up to 1/8 of the side) applies to an image with probability P, and the network "
        "is told which; its samples are not augmented (default: off)",
        minimum=0,
        maximum=1,
        metavar="P",
    )
    augment_transforms: str = option(
        ",".join(TRANSFORMS),
        f"the transforms --augment uses, comma-separated, of {', '.join(TRANSFORMS)}",
        metavar="LIST",
    )
    # the run folder
    out: str = option("runs/digits", "run directory for checkpoints, log and pictures", required=True)
    resume: str | None = option(
        None,
        "continue exactly from OUT's newest checkpoint (or start if it has none), or from PATH",
        metavar="latest|PATH",
        file=False,
    )
    overwrite: bool = option(
        False,
        "start afresh in an OUT that already holds a run: the old run is moved aside and deleted",
        file=False,
    )
    checkpoint_every: int = option(500, "steps between checkpoints", minimum=1)
    keep_last: int = option(3, "checkpoints kept in OUT/checkpoints", minimum=1)
    max_nonfinite: int = option(10, "stop after this many non-finite steps in a row; each is skipped", minimum=1)
    # model and noise
    preset: str = option("digits", "UNet preset", choices=PRESETS)
    image_size: int | None = option(None, "image side in pixels (default: the preset's)", minimum=4, maximum=1024)
    dropout: float | None = option(
        None, "residual-block dropout (default: the preset's, 0.1)", minimum=0, exclusive_maximum=1
    )
    base_channels: int | None = option(
        None, "the network's width at its first level (default: the preset's)", minimum=8, maximum=1024
    )
    patch_size: int | None = option(
        None,
        "space-to-depth: the network runs on PxP blocks of pixels, 1/P^2 of the positions (default: the preset's)",
        minimum=1,
        maximum=16,
    )
    beta_schedule: str = option("linear", choices=BETA_SCHEDULES)
    prediction: str = option("eps", "what the network predicts", choices=PREDICTIONS)
    zero_terminal_snr: bool = option(
        False, "rescale the betas so the last step is pure noise (Lin et al. 2023); use with --prediction v"
    )
    # optimisation
    steps: int = option(3000, "optimizer steps", minimum=1)
    batch_size: int = option(64, "per process and per micro-batch", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", minimum=1)
    lr: float = option(1e-3, "peak learning rate", exclusive_minimum=0)
    warmup_steps: int = option(100, "linear learning-rate warm-up", minimum=0)
    lr_schedule: str = option("constant", "after warm-up", choices=LR_SCHEDULES)
    weight_decay: float = option(0.0, "AdamW", minimum=0)
    adam_beta1: float = option(0.9, "AdamW", minimum=0, exclusive_maximum=1)
    adam_beta2: float = option(
        0.999, "AdamW; 0.99 adapts faster, which helped a short digits run", minimum=0, exclusive_maximum=1
    )
    grad_clip: float = option(1.0, "gradient-norm clip", exclusive_minimum=0, cli=False)
    ema_decay: float = option(0.999, minimum=0, exclusive_maximum=1)
    seed: int = option(0, minimum=0)
    # loss
    min_snr_gamma: float | None = option(
        None,
        "Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs) (default: off)",
        exclusive_minimum=0,
    )
    input_perturbation: float = option(
        0.0,
        "DDPM-IP (Ning et al. 2023): noise the input with noise + GAMMA * extra noise, keep the target; "
        "0.1 is theirs (default: off)",
        minimum=0,
        maximum=1,
        metavar="GAMMA",
    )
    # hardware
    device: str = option("auto", "where the network trains; auto is the GPU when there is one", choices=DEVICES)
    precision: str = option(
        "auto",
        "bf16 autocast, or fp16 autocast with loss scaling (for GPUs); auto: bf16 on a CPU with bf16 instructions "
        "(AVX-512 BF16 or AMX, 1.3x to 1.5x faster there), fp32 elsewhere",
        choices=PRECISION_CHOICES,
    )
    deterministic: bool = option(
        True,
        "deterministic CUDA kernels, so that a resumed GPU run is bitwise exact; CPU training is "
        "deterministic either way",
    )
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the network (slow to start)")
    time_limit: float | None = option(
        None, "seconds; stop early when reached (used by the demo)", exclusive_minimum=0, cli=False
    )
    # monitoring
    log_every: int = option(10, "steps per log row", minimum=1)
    sample_every: int | None = option(None, "write OUT/samples/step_N.png every N steps", minimum=1)
    tensorboard: bool = option(False, "also log to OUT/tensorboard (needs the extra)")
    eval_every: int | None = option(None, "score the EMA model every N steps into log.csv", minimum=1)
    eval_metrics: str = option("fid,kid", "metrics for --eval-every (see inkwash eval)")
    eval_samples: int = option(500, "images per --eval-every", minimum=2)
    eval_reference: str | None = option(None, "digits, a folder or an .npz (default: --data when it is one)")

    @property
    def transforms(self) -> tuple[str, ...]:
        """``augment_transforms`` as a tuple of names."""
        return tuple(name.strip() for name in self.augment_transforms.split(",") if name.strip())

    def validate(self) -> None:
        check_options(self)
        unknown = [name for name in self.transforms if name not in TRANSFORMS]
        if unknown or not self.transforms:
            raise InkwashError(
                f"--augment-transforms must name some of {', '.join(TRANSFORMS)}, got {self.augment_transforms!r}"
            )
        if self.zero_terminal_snr and self.prediction == "eps":
            raise InkwashError(
                "--zero-terminal-snr needs --prediction v or x0: at zero SNR the noise says nothing about the image"
            )
