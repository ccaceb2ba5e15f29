"""One training run per folder: the claim a training process holds on ``--out``.

A run folder belongs to one run at a time. The training process holds an exclusive lock on
``RUN/.lock`` for as long as it runs, so a second process writing into the same folder is refused
instead of interleaving checkpoints, and anything a dead writer left half-written under
``checkpoints/`` can be removed safely. A fresh run (not ``--resume``) refuses a folder that already
holds checkpoints unless told ``--overwrite``; it then moves the old folder aside with one atomic
rename and deletes it, so a crash at any moment leaves either the whole old run or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from inkwash.checkpoint import CHECKPOINTS_DIR, step_dirs
from inkwash.errors import InkwashError

LOCK_FILE = ".lock"
ASIDE_MARK = ".old-run-"


def new_run_id() -> str:
    """An identity for one run's lineage, kept across resumes; pruning only touches its own checkpoints."""
    return uuid.uuid4().hex


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock``; the kernel drops it if the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise InkwashError(
                f"{run_dir} is in use by another training process (pid {holder}); wait for it or choose another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _describe(run_dir: Path, found: list[Path]) -> str:
    return f"{run_dir} already holds a training run ({len(found)} checkpoint(s), newest {found[-1].name})"


def _is_own_checkpoint(resume_from: Path | None, run_dir: Path) -> bool:
    if resume_from is None:
        return False
    return resume_from.resolve().parent == (run_dir / CHECKPOINTS_DIR).resolve()


def claim_run_folder(run_dir: Path, resume_from: Path | None, resuming: bool, overwrite: bool) -> RunLock:
    """Create and lock ``run_dir`` for one training process.

    ``resuming`` is true when the run continues a checkpoint of this folder (``--resume latest`` or a
    path inside it). A fresh run, or one that continues another folder's checkpoint, must not mix its
    checkpoints with the ones already here: it is refused, or with ``overwrite`` the old folder is
    moved aside atomically and removed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        found = step_dirs(run_dir)
        if not found or (resuming and (resume_from is None or _is_own_checkpoint(resume_from, run_dir))):
            return lock
        if not overwrite:
            raise InkwashError(
                f"{_describe(run_dir, found)}; continue it with --resume latest, or replace it with --overwrite"
            )
        return _replace(run_dir, lock)
    except BaseException:
        lock.release()
        raise


def _replace(run_dir: Path, lock: RunLock) -> RunLock:
    resolved = run_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise InkwashError(f"--overwrite will not move {run_dir} aside: it holds the current directory")
    aside = resolved.with_name(f".{resolved.name}{ASIDE_MARK}{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(resolved, aside)  # the commit point: from here on the old run is out of sight, whole
    fresh: RunLock | None = None
    try:
        run_dir.mkdir()
        fresh = RunLock(run_dir)
    finally:
        lock.release()
        if fresh is None:  # could not start the new folder: put the old run back where it was
            with contextlib.suppress(OSError):
                run_dir.rmdir()
                os.replace(aside, resolved)
    shutil.rmtree(aside, ignore_errors=True)
    print(f"--overwrite: removed the previous run in {run_dir}")
    return fresh
