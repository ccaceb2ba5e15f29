"""The models a server offers: found once at start-up, picked by name, each loaded once and kept.

Nothing a client sends becomes a path: requests name a model from ``ModelStore.names``, and only the
paths found by the server itself are ever opened.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from inkwash.checkpoint import CONFIG_FILE, newest_checkpoint, read_config
from inkwash.errors import InkwashError
from inkwash.pipeline import Pipeline, class_names


@dataclass
class ModelEntry:
    name: str
    path: Path  # the run folder (or checkpoint folder) as found by the server
    config: dict  # its newest checkpoint's config.json
    checkpoint: Path

    @property
    def classes(self) -> list[str]:
        return class_names(self.config)

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.config["data"]["shape"]
        return int(channels), int(height), int(width)


def _entry(name: str, path: Path) -> ModelEntry:
    checkpoint = newest_checkpoint(path)
    if checkpoint is None:
        raise InkwashError(f"not an inkwash run folder: {path}")
    return ModelEntry(name, path, read_config(checkpoint), checkpoint)


def find_models(checkpoint: str | None, models_dir: str | None) -> list[ModelEntry]:
    """``--checkpoint RUN`` (named after its folder) and every run folder under ``--models DIR`` (named by
    its path relative to DIR); the first is the default model."""
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
        for config in sorted(root.rglob(CONFIG_FILE)):
            run = config.parent
            if run.parent.name == "checkpoints":  # step_N/config.json: the run is two levels up
                run = run.parent.parent
            name = run.relative_to(root).as_posix() if run != root else root.resolve().name
            if any(entry.name == name or entry.path.resolve() == run.resolve() for entry in entries):
                continue
            try:
                entries.append(_entry(name, run))
            except (InkwashError, OSError, ValueError, KeyError):
                continue  # a folder that is not a run; skipped
    if not entries:
        raise InkwashError(f"no inkwash run folders found under {models_dir}")
    return entries


class ModelStore:
    """The models on offer, the current one, and the pipelines loaded so far (each loaded once)."""

    def __init__(self, entries: list[ModelEntry], device: str = "auto") -> None:
        self.entries = {entry.name: entry for entry in entries}
        self.current = entries[0].name
        self.device = device
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
                self._pipelines[name] = Pipeline.load(entry.checkpoint, device=self.device)
            return self._pipelines[name]

    def sha256(self, name: str) -> str:
        """The SHA-256 of a model's EMA weights file (or its first weights file), computed once."""
        with self._lock:
            if name not in self._hashes:
                checkpoint = self.entry(name).checkpoint
                files = sorted(checkpoint.glob("*.safetensors"), key=lambda p: (p.name != "ema.safetensors", p.name))
                digest = hashlib.sha256()
                if files:
                    with open(files[0], "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                self._hashes[name] = digest.hexdigest()
            return self._hashes[name]
