"""The models a server offers: found once at start-up, picked by name, each loaded once and kept.

A model is an inkwash run folder or a diffusers pipeline folder (a folder with ``model_index.json``: a Stable
Diffusion pipeline, or a pixel-space ``DDPMPipeline`` / ``DDIMPipeline``). What the server checks requests
against (the size, the classes, the training steps, whether it takes a text prompt) is read from the folders'
JSON files at start-up; weights are read only when a model is first used.

Nothing a client sends becomes a path: requests name a model from ``ModelStore.names``, and only the
paths found by the server itself are ever opened.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from inkwash.checkpoint import CONFIG_FILE, newest_checkpoint, read_config
from inkwash.errors import InkwashError
from inkwash.interop.diffusers_folder import (
    INDEX_FILE,
    bare_scheduler_config,
    is_diffusers_folder,
    is_stable_diffusion_folder,
)
from inkwash.pipeline import Pipeline, class_names


@dataclass
class ModelEntry:
    name: str
    path: Path  # the run folder (or checkpoint folder) as found by the server
    config: dict  # its newest checkpoint's config.json (a diffusers folder: the same fields, from its JSON files)
    checkpoint: Path  # the checkpoint folder (a diffusers folder: the folder itself)
    text_conditional: bool = False  # a Stable Diffusion folder: any text prompt, any size in multiples of 8
    size_multiple: int = 1  # a text-conditional model's width and height are multiples of this (the VAE's)

    @property
    def classes(self) -> list[str]:
        return class_names(self.config)

    @property
    def num_steps(self) -> int:
        """The training timesteps: the most sampler steps the model takes."""
        return int(self.config.get("schedule", {}).get("num_steps", 1000))

    @property
    def kind(self) -> str:
        if self.text_conditional:
            return "stable-diffusion"
        return "diffusers" if self.config.get("format") == "diffusers" else "inkwash"

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.config["data"]["shape"]
        return int(channels), int(height), int(width)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InkwashError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InkwashError(f"{path} is not a JSON object")
    return data


def _side(value: object, path: Path) -> int:
    """A UNet's ``sample_size`` as one side (square models; a [h, w] pair gives its height, checked equal)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise InkwashError(f"{path}: unet sample_size {value!r} is not supported")
    return value


def _diffusers_entry(name: str, path: Path) -> ModelEntry:
    """An entry for a diffusers folder, from its JSON files alone (``Pipeline.load`` checks the rest)."""
    if (path / INDEX_FILE).is_file():
        index = _json(path / INDEX_FILE)
        unet = _json(path / "unet" / "config.json")
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
    else:  # a bare UNet2DModel folder, its scheduler config in it or beside it
        index = {"_class_name": "UNet2DModel"}
        unet = _json(path / "config.json")
        scheduler = _json(bare_scheduler_config(path))
    steps = scheduler.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or steps < 2:
        raise InkwashError(f"{path}: num_train_timesteps {steps!r} is not supported")
    side = _side(unet.get("sample_size"), path)
    config = {"format": "diffusers", "pipeline": index.get("_class_name"), "unet": {"num_classes": 0}}
    config["schedule"] = {"num_steps": steps}
    if is_stable_diffusion_folder(path):
        vae = _json(path / "vae" / "config.json")
        downsample = 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)
        config["data"] = {"shape": [3, side * downsample, side * downsample], "class_names": []}
        return ModelEntry(name, path, config, path, text_conditional=True, size_multiple=downsample)
    channels = unet.get("in_channels", 3)
    config["data"] = {"shape": [int(channels), side, side], "class_names": []}
    return ModelEntry(name, path, config, path)


def _entry(name: str, path: Path) -> ModelEntry:
    if is_diffusers_folder(path):
        return _diffusers_entry(name, path)
    checkpoint = newest_checkpoint(path)
    if checkpoint is None:
        raise InkwashError(f"not an inkwash run folder: {path}")
    return ModelEntry(name, path, read_config(checkpoint), checkpoint)


def find_models(checkpoint: str | None, models_dir: str | None) -> list[ModelEntry]:
    """``--checkpoint RUN`` (named after its folder) and every run folder and diffusers folder under
    ``--models DIR`` (named by its path relative to DIR); the first is the default model."""
    entries: list[ModelEntry] = []
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_dir():
            raise InkwashError(f"--checkpoint: run folder not found: {path}")
        entries.append(_entry(path.resolve().name, path))
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise InkwashError(f"--models: folder not found: {root}")
        folders = {index.parent for index in root.rglob(INDEX_FILE)}  # diffusers folders
        found = []
        for config in root.rglob(CONFIG_FILE):
            if any(folder == config.parent or folder in config.parents for folder in folders):
                continue  # unet/config.json and the like, inside a diffusers folder
            run = config.parent
            if run.parent.name == "checkpoints":  # step_N/config.json: the run is two levels up
                run = run.parent.parent
            found.append(run)
        for run in sorted(set(found) | folders):
            name = run.relative_to(root).as_posix() if run != root else root.resolve().name
            if any(entry.name == name or entry.path.resolve() == run.resolve() for entry in entries):
                continue
            try:
                entries.append(_entry(name, run))
            except (InkwashError, OSError, ValueError, KeyError):
                continue  # a folder that is not a run; skipped
    if not entries:
        raise InkwashError(f"no inkwash run folders or diffusers folders found under {models_dir}")
    return entries


class ModelStore:
    """The models on offer, the current one, and the pipelines loaded so far (each loaded once)."""

    def __init__(self, entries: list[ModelEntry], device: str = "auto", precision: str = "fp32") -> None:
        self.entries = {entry.name: entry for entry in entries}
        self.current = entries[0].name
        self.device = device
        self.precision = precision  # a Stable Diffusion folder's weights are loaded in it (Pipeline.load)
        self._pipelines: dict[str, Pipeline] = {}
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str | None) -> ModelEntry:
        """The entry named (the current one for None); KeyError naming the choices when unknown."""
        name = self.current if name is None else name
        if name not in self.entries:
            raise KeyError(f"unknown model {name!r}; choose from {', '.join(self.entries)}")
        return self.entries[name]

    def title(self, name: str) -> str:
        """The WebUI's title of a model: its name and short hash."""
        return f"{name} [{self.sha256(name)[:10]}]"

    def by_title(self, value: object) -> object:
        """A model's name from its name or its title (what clients copy from sd-models); anything else as is."""
        if isinstance(value, str) and value not in self.entries:
            for name in self.entries:
                if value == self.title(name):
                    return name
        return value

    def pipeline(self, name: str) -> Pipeline:
        """The loaded pipeline of a model, loading it the first time (called by the worker thread)."""
        with self._lock:
            if name not in self._pipelines:
                entry = self.entry(name)
                self._pipelines[name] = Pipeline.load(entry.checkpoint, device=self.device, precision=self.precision)
            return self._pipelines[name]

    def sha256(self, name: str) -> str:
        """The SHA-256 of a model's EMA weights file (or its first weights file; a diffusers folder's UNet
        weights), computed once."""
        with self._lock:
            if name not in self._hashes:
                checkpoint = self.entry(name).checkpoint
                if is_diffusers_folder(checkpoint) and (checkpoint / "unet").is_dir():
                    checkpoint = checkpoint / "unet"
                files = sorted(checkpoint.glob("*.safetensors"), key=lambda p: (p.name != "ema.safetensors", p.name))
                digest = hashlib.sha256()
                if files:
                    with open(files[0], "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                self._hashes[name] = digest.hexdigest()
            return self._hashes[name]
