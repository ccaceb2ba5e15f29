"""One thread runs the model, behind a bounded queue, and publishes its progress.

Requests are ``Task``s: a function of a ``Progress`` that the worker calls in turn. ``submit`` never
blocks: a full queue raises ``QueueFull`` (the server's 429). ``interrupt`` stops the running task at
its next sampler step. ``snapshot`` reads the progress for ``/sdapi/v1/progress`` at any time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

import torch

from inkwash.sampling.generate import SamplingInterrupted


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Task:
    run: Callable[[Progress], object]
    job: str  # a name for the progress state, e.g. "txt2img"
    future: Future = field(default_factory=Future)
    interrupted: bool = False


class Progress:
    """The running task's progress, written by the worker and read by the server's other threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.task: Task | None = None
        self.total_steps = 0
        self.done_steps = 0
        self.step = 0  # the current batch's step
        self.steps = 0  # the current batch's steps
        self.job_no = 0
        self.job_count = 0
        self.started = 0.0
        self.timestamp = ""
        self.preview: torch.Tensor | None = None  # the current predicted x0 of the running batch
        # How to turn the preview into [-1, 1] pixels when that costs work (a latent model's VAE); None: as is.
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.serial = 0  # counts the tasks begun
        self.updates = 0  # counts the preview's updates within the task

    def begin(self, task: Task) -> None:
        with self._lock:
            self.task, self.total_steps, self.done_steps = task, 0, 0
            self.step = self.steps = self.job_no = self.job_count = 0
            self.started, self.preview, self.decode = time.monotonic(), None, None
            self.serial, self.updates = self.serial + 1, 0
            self.timestamp = datetime.now().strftime("%Y%m%d%H%M%S")

    def end(self) -> None:
        with self._lock:
            self.task, self.preview, self.decode = None, None, None

    def plan(self, total_steps: int, job_count: int) -> None:
        """Called by a task before sampling: the steps over all its batches and the number of batches."""
        with self._lock:
            self.total_steps, self.job_count = max(1, total_steps), job_count

    def set_decoder(self, decode: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Called by a task whose previews are latents: the function that decodes them to pixels."""
        with self._lock:
            self.decode = decode

    def on_step(self, state: dict, steps: int, batch_size: int) -> None:
        """The sampler's per-step hook; raises ``SamplingInterrupted`` once the task is interrupted."""
        with self._lock:
            self.step, self.steps = state["i"] + 1, steps
            self.job_no = state["start"] // max(1, batch_size)
            self.done_steps = self.job_no * steps + self.step
            self.preview = state["denoised"].detach()
            self.updates += 1
            interrupted = self.task is not None and self.task.interrupted
        if interrupted:
            raise SamplingInterrupted

    def snapshot(self) -> dict:
        with self._lock:
            task = self.task
            fraction = min(1.0, self.done_steps / self.total_steps) if task is not None and self.total_steps else 0.0
            elapsed = time.monotonic() - self.started if task is not None else 0.0
            return {
                "progress": fraction,
                "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
                "state": {
                    "skipped": False,
                    "interrupted": bool(task and task.interrupted),
                    "stopping_generation": False,
                    "job": task.job if task else "",
                    "job_count": self.job_count if task else 0,
                    "job_timestamp": self.timestamp if task else "0",
                    "job_no": self.job_no if task else 0,
                    "sampling_step": self.step if task else 0,
                    "sampling_steps": self.steps if task else 0,
                },
                "preview": self.preview if task else None,
                "decode": self.decode if task else None,
                "preview_key": (self.serial, self.updates),
            }


class Worker:
    """The model thread. ``queue_size`` tasks may wait behind the running one."""

    def __init__(self, queue_size: int) -> None:
        self.queue: queue.Queue[Task | None] = queue.Queue(maxsize=queue_size)
        self.progress = Progress()
        self._thread = threading.Thread(target=self._loop, name="inkwash-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Progress], object], job: str) -> Future:
        task = Task(run, job)
        try:
            self.queue.put_nowait(task)
        except queue.Full:
            raise QueueFull from None
        return task.future

    def interrupt(self) -> bool:
        """Stop the running task at its next step; False when nothing is running."""
        task = self.progress.task
        if task is None:
            return False
        task.interrupted = True
        return True

    def close(self) -> None:
        while True:  # fail what is still waiting, then stop the thread
            try:
                task = self.queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.cancel()
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            task = self.queue.get()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            self.progress.begin(task)
            try:
                task.future.set_result(task.run(self.progress))
            except BaseException as exc:  # the request gets the error; the worker goes on
                task.future.set_exception(exc)
            finally:
                self.progress.end()
