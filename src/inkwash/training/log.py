"""``log.csv``, the run's training log: one row every ``--log-every`` steps with the loss averaged
since the row before, the learning rate, the throughput, the skipped steps and any evaluation scores.
This module writes it and is its one reader."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from inkwash.files import atomic_write_bytes

LOG_FILE = "log.csv"
LOSS_CURVE_FILE = "loss.png"
REFRESH_SECONDS = 30  # keep log.csv fresh for people watching it, between checkpoints


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows as written (strings; an evaluation column is empty on rows without an evaluation)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_log(path: str | Path) -> dict[str, list[float]]:
    """The log as columns of numbers, NaN where a row has no value (an evaluation column between
    evaluations)."""
    rows = read_rows(path)
    return {
        key: [float(row[key]) if row[key] not in ("", None) else math.nan for row in rows]
        for key in (rows[0] if rows else [])
    }


def write_log(path: Path, rows: list[dict]) -> None:
    fieldnames: list[str] = []
    for row in rows:
        fieldnames.extend(key for key in row if key not in fieldnames)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or ["step", "loss"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


class TrainingLog:
    """The rows of one run in memory, the losses since the last row, and the throughput. Every rank
    keeps them (each reports its losses); only the one made with ``writes=True`` writes the file."""

    def __init__(self, path: Path, images_per_step: int, writes: bool) -> None:
        self.path, self.images_per_step, self.writes = path, images_per_step, writes
        self.rows: list[dict] = []
        self.first_loss = self.final_loss = math.nan
        self.losses: list[float] = []  # since the last row
        self.start(0)

    def start(self, step: int) -> None:
        self.interval_start = self.written = time.perf_counter()
        self.interval_step = step

    def resume(self, step: int) -> None:
        """Carry on the log of the checkpoint at ``step``: rows after it belong to a lost future."""
        self.rows = [row for row in read_rows(self.path) if int(row["step"]) <= step]

    def add_loss(self, loss: float) -> None:
        if math.isnan(self.first_loss):
            self.first_loss = loss
        self.losses.append(loss)

    def add_row(self, step: int, lr: float, skipped: int, scores: dict[str, float]) -> float:
        """Close the interval since the last row; returns its throughput in images per second."""
        now = time.perf_counter()
        images_per_sec = (step - self.interval_step) * self.images_per_step / max(now - self.interval_start, 1e-9)
        if self.losses:
            self.final_loss = sum(self.losses) / len(self.losses)
        self.rows.append(
            {
                "step": step,
                "loss": f"{self.final_loss:.6f}",
                "lr": f"{lr:.6g}",
                "images_per_sec": f"{images_per_sec:.2f}",
                "skipped": skipped,
                **{name: f"{value:.6g}" for name, value in scores.items()},
            }
        )
        self.interval_start, self.interval_step, self.losses = now, step, []
        if now - self.written > REFRESH_SECONDS:
            self.write()
        return images_per_sec

    def write(self) -> None:
        if self.writes:
            write_log(self.path, self.rows)
            self.written = time.perf_counter()
