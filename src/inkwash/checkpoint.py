"""Checkpoints: safetensors weights plus a JSON config, written atomically.

A checkpoint directory holds ``config.json`` (enough to rebuild the model and its schedule),
``model.safetensors``, ``ema.safetensors`` and, from training, ``optimizer.safetensors`` and
``state.safetensors``. Every file is written to a temporary file, fsynced and renamed over the old
one, so a crash never leaves a torn file. A training run keeps its checkpoints in
``RUN/checkpoints/step_NNNNNNNN`` (see ``resume.py``); anything that takes a checkpoint also takes
the run directory and uses its newest complete checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.unet import UNet, UNetConfig
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes, atomic_write_text

FORMAT = "inkwash"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InkwashError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InkwashError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state_dict into tensors plus JSON-able metadata (no pickle)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value)
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    for group, current in zip(groups, optimizer.param_groups, strict=False):
        for key, value in group.items():  # JSON has no tuples: betas come back as the tuple they were
            if isinstance(value, list) and isinstance(current.get(key), tuple):
                group[key] = tuple(value)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: str | Path,
    config: dict,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write weights first and config.json last, each atomically."""
    run_dir = Path(run_dir)
    if optimizer is not None:
        tensors, metadata = optimizer_tensors(optimizer)
        save_tensors(run_dir / OPTIMIZER_FILE, tensors, metadata)
    save_tensors(run_dir / MODEL_FILE, model.state_dict())
    save_tensors(run_dir / EMA_FILE, ema.state_dict())
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")


CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first. A step directory appears only by an atomic
    rename once all of its files are on disk, so every one listed here is whole."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        suffix = entry.name[len(STEP_PREFIX) :]
        if entry.name.startswith(STEP_PREFIX) and suffix.isdigit() and (entry / CONFIG_FILE).is_file():
            found.append((int(suffix), entry))
    return [path for _, path in sorted(found)]


def newest_checkpoint(path: str | Path, marker: str = CONFIG_FILE) -> Path | None:
    """``path`` itself when it is a checkpoint (it holds ``marker``), else the newest complete
    checkpoint of the run directory ``path``, or None when it has none."""
    path = Path(path)
    if (path / marker).is_file():
        return path
    found = step_dirs(path)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise InkwashError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise InkwashError(f"--checkpoint must be a run directory, got a file: {path}")
    found = newest_checkpoint(path)
    if found is None:
        raise InkwashError(f"not an inkwash run directory (no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/): {path}")
    return found


def read_config(run_dir: str | Path) -> dict:
    run_dir = resolve_checkpoint(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InkwashError(f"not an inkwash run directory (no {CONFIG_FILE}): {run_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InkwashError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InkwashError(f"{path} is not an inkwash checkpoint config")
    return config


def build_from_config(config: dict) -> tuple[UNet, NoiseSchedule]:
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InkwashError(f"checkpoint config is invalid: {exc}") from None
    return UNet(unet_config), schedule


def load_weights(model: nn.Module, path: str | Path) -> None:
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        detail = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong-shaped tensors"
        raise InkwashError(f"{path} does not match the model in config.json ({detail})")
    model.load_state_dict(tensors)


def load_model(run_dir: str | Path, use_ema: bool = True) -> tuple[UNet, NoiseSchedule, dict]:
    """Rebuild the network and schedule from a run directory and load its (EMA) weights."""
    run_dir = resolve_checkpoint(run_dir)
    config = read_config(run_dir)
    model, schedule = build_from_config(config)
    load_weights(model, run_dir / (EMA_FILE if use_ema else MODEL_FILE))
    model.eval()
    return model, schedule, config
