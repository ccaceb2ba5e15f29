"""Crash-safe training checkpoints and exact resume.

Each checkpoint is a directory ``RUN/checkpoints/step_NNNNNNNN`` holding the model, the EMA, the
optimizer, ``state.safetensors`` (every RNG state, the data order, the step and the loss-scaler
state) and ``config.json``. It is written in full under a temporary name, every file fsynced, and
only then renamed into place, so a kill -9 at any moment leaves the newest complete checkpoint
loadable. ``--keep-last N`` removes older ones the same way: renamed out of sight first, then deleted.
A run resumes only from a checkpoint of the same model, schedule and data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from inkwash.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STEP_PREFIX,
    load_optimizer_state,
    load_tensors,
    load_weights,
    newest_checkpoint,
    save_checkpoint,
    save_tensors,
    step_dirs,
)
from inkwash.errors import InkwashError
from inkwash.files import fsync_dir

if TYPE_CHECKING:
    from inkwash.core.schedule import NoiseSchedule
    from inkwash.core.unet import UNetConfig
    from inkwash.data.loading import ImageData
    from inkwash.training.config import TrainConfig

STATE_FILE = "state.safetensors"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"


@dataclass
class ResumeState:
    """Everything besides the weights that an uninterrupted run would still have in memory: what
    ``state.safetensors`` holds, so that a resumed run goes on bitwise as if never stopped."""

    step: int
    data_rng: torch.Tensor  # the shared data-order generator
    order: torch.Tensor  # the current epoch's permutation
    position: int  # how far into it
    noise_rng: list[torch.Tensor]  # per rank: timesteps, noise, flips, label dropout
    torch_rng: list[torch.Tensor]  # per rank: the global CPU generator (dropout)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # per rank, on GPU runs
    counters: dict = field(default_factory=dict)  # non-finite step counts and the like
    scaler: dict | None = None  # torch.amp.GradScaler state (fp16)

    @property
    def world_size(self) -> int:
        return len(self.noise_rng)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def run_config(
    config: TrainConfig, unet_config: UNetConfig, schedule: NoiseSchedule, data: ImageData, step: int, run_id: str
) -> dict:
    """A training checkpoint's ``config.json``: enough to rebuild the model and its schedule, and to
    tell whether a run may resume from it."""
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


def save_state(path: Path, state: ResumeState) -> None:
    tensors = {"data_rng": state.data_rng, "order": state.order}
    for name in ("noise_rng", "torch_rng", "cuda_rng"):
        for rank, value in enumerate(getattr(state, name)):
            tensors[f"{name}.{rank}"] = value
    metadata = {
        "step": str(state.step),
        "position": str(state.position),
        "world_size": str(state.world_size),
        "counters": json.dumps(state.counters),
        "scaler": json.dumps(state.scaler),
    }
    save_tensors(path, tensors, metadata)


def load_state(path: Path) -> ResumeState:
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        world_size = int(metadata["world_size"])

        def per_rank(name: str) -> list[torch.Tensor]:
            return [tensors[f"{name}.{rank}"] for rank in range(world_size) if f"{name}.{rank}" in tensors]

        return ResumeState(
            step=int(metadata["step"]),
            data_rng=tensors["data_rng"],
            order=tensors["order"],
            position=int(metadata["position"]),
            noise_rng=per_rank("noise_rng"),
            torch_rng=per_rank("torch_rng"),
            cuda_rng=per_rank("cuda_rng"),
            counters=json.loads(metadata.get("counters", "{}")),
            scaler=json.loads(metadata.get("scaler", "null")),
        )
    except (KeyError, ValueError) as exc:
        raise InkwashError(f"{path} is not an inkwash training state ({exc})") from None


def write_training_checkpoint(
    run_dir: str | Path,
    config: dict,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: ResumeState,
    keep_last: int | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_NNNNNNNN`` atomically, then prune to the newest ``keep_last``."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_dir_name(state.step)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=folder))
    try:
        save_state(temp / STATE_FILE, state)
        save_checkpoint(temp, config, model, ema, optimizer)  # config.json last
        fsync_dir(temp)
        if final.exists():  # the same step again, after resuming from an older checkpoint
            _retire(final)
        os.replace(temp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if keep_last is not None:
        own = [path for path in step_dirs(run_dir) if _run_id(path) == config.get("run_id")]
        for old in own[:-keep_last]:  # another run's checkpoints are never this run's to prune
            _retire(old)
    return final


def _run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _retire(path: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}.{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(run_dir: str | Path) -> int:
    """Remove what a killed writer left behind (temporary and half-deleted directories). Call it only
    while holding the folder's lock (``run_folder.claim_run_folder``): then no live writer owns them."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def find_resume_checkpoint(spec: str, run_dir: str | Path) -> Path | None:
    """``latest``: the run's newest complete checkpoint, or None when it has none yet (a fresh start,
    so one command both starts and restarts a job); otherwise a checkpoint or run directory."""
    if spec == "latest":
        return newest_checkpoint(run_dir, STATE_FILE)
    path = Path(spec)
    if not path.is_dir():
        raise InkwashError(f"--resume: no such checkpoint directory: {path}")
    found = newest_checkpoint(path, STATE_FILE)
    if found is None:
        raise InkwashError(f"--resume: {path} holds no training checkpoint (no {STATE_FILE}, no {CHECKPOINTS_DIR}/)")
    return found


def check_compatible(saved: dict, wanted: dict, path: Path) -> None:
    """The model, its noise schedule and the number of images must be the same (``wanted`` is this
    run's ``run_config``); anything else (steps, learning rate, logging) may change on resume."""
    differences = []
    for section in ("unet", "schedule"):
        old, new = saved.get(section, {}), wanted[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(f"{section}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    if saved.get("prediction") != wanted["prediction"]:
        differences.append(f"prediction {saved.get('prediction')!r} -> {wanted['prediction']!r}")
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise InkwashError(f"cannot resume from {path}: this run's model differs from the checkpoint's ({shown})")
    saved_images = saved.get("data", {}).get("num_images")
    if saved_images != wanted["data"]["num_images"]:
        raise InkwashError(
            f"cannot resume from {path}: it was trained on {saved_images} images, "
            f"this run has {wanted['data']['num_images']}"
        )


def load_training_checkpoint(
    path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer
) -> ResumeState:
    """Load weights, EMA and optimizer in place (check the config with ``check_compatible`` first);
    return the training state."""
    load_weights(model, path / MODEL_FILE)
    load_weights(ema, path / EMA_FILE)
    load_optimizer_state(optimizer, path / OPTIMIZER_FILE)
    return load_state(path / STATE_FILE)
