"""Crash-safe checkpoints and exact resume: a run stopped at step k and resumed reaches step n with
weights bitwise identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inkwash.checkpoint import load_tensors, resolve_checkpoint, step_dirs
from inkwash.data.loading import load_digits
from inkwash.errors import InkwashError
from inkwash.training.loop import TrainConfig, train
from inkwash.training.resume import clean_partial, load_state

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


def config(out, **overrides) -> TrainConfig:
    # The digits preset has dropout, so the global RNG state matters; flips, augmentation, label dropout, a cosine
    # schedule and Min-SNR weighting exercise every other stream and setting that resume restores.
    settings = dict(
        out=str(out),
        preset="digits",
        steps=7,
        batch_size=4,
        checkpoint_every=3,
        warmup_steps=2,
        lr_schedule="cosine",
        hflip=True,
        augment=0.5,
        class_cond=True,
        min_snr_gamma=5.0,
        log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def final_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    latest = resolve_checkpoint(run_dir)
    return {name: load_tensors(latest / name) for name in FILES}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for name in FILES:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}:{key}"


@pytest.mark.parametrize("stop_at", [3, 5])
def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path, digits, stop_at):
    train(config(tmp_path / "straight"), data=digits, show_progress=False)
    stopped = train(config(tmp_path / "split"), data=digits, show_progress=False, stop=lambda step: step == stop_at)
    assert stopped.steps == stop_at and stopped.interrupted == "stop"
    resumed = train(config(tmp_path / "split", resume="latest"), data=digits, show_progress=False)
    assert resumed.steps == 7
    straight, split = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "split")
    assert_bitwise_equal(straight, split)
    # The EMA never leaks into the trained weights: they differ, in both runs alike.
    model, ema = split["model.safetensors"], split["ema.safetensors"]
    assert any(not torch.equal(model[key], ema[key]) for key in model)
    # The log carries on without duplicated steps.
    rows = (tmp_path / "split" / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 8))


def test_resume_with_gradient_accumulation_is_bitwise_identical(tmp_path, digits):
    settings = dict(grad_accum=2, steps=4, checkpoint_every=2)
    train(config(tmp_path / "a", **settings), data=digits, show_progress=False)
    train(config(tmp_path / "b", **settings), data=digits, show_progress=False, stop=lambda step: step == 2)
    train(config(tmp_path / "b", resume="latest", **settings), data=digits, show_progress=False)
    assert_bitwise_equal(final_tensors(tmp_path / "a"), final_tensors(tmp_path / "b"))


def test_resume_restores_step_rngs_and_data_order(tmp_path, digits):
    train(config(tmp_path, steps=3), data=digits, show_progress=False)
    state = load_state(resolve_checkpoint(tmp_path) / "state.safetensors")
    assert state.step == 3
    assert sorted(state.order.tolist()) == list(range(len(digits)))
    assert state.position == 3 * 4
    assert state.world_size == 1 and len(state.torch_rng) == 1


def test_keep_last_prunes_old_checkpoints(tmp_path, digits):
    train(config(tmp_path, preset="tiny", steps=6, checkpoint_every=1, keep_last=2), data=digits, show_progress=False)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_00000005", "step_00000006"]


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, digits):
    result = train(config(tmp_path, preset="tiny", steps=2, resume="latest"), data=digits, show_progress=False)
    assert result.steps == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(preset="digits", class_cond=False), "unet.num_classes"),
        (dict(image_size=8), "unet.image_size"),
        (dict(prediction="v"), "prediction"),
        (dict(beta_schedule="cosine"), "schedule.beta_schedule"),
    ],
)
def test_resume_with_a_mismatched_config_is_a_clear_error(tmp_path, digits, change, message):
    train(config(tmp_path, steps=1), data=digits, show_progress=False)
    data = load_digits(8) if change.get("image_size") == 8 else digits
    with pytest.raises(InkwashError, match=f"cannot resume.*{message}"):
        train(config(tmp_path, steps=2, resume="latest", **change), data=data, show_progress=False)


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path, digits):
    with pytest.raises(InkwashError, match="no such checkpoint"):
        train(config(tmp_path, resume=str(tmp_path / "nope")), data=digits, show_progress=False)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, digits, monkeypatch):
    import inkwash.training.resume as resume

    train(config(tmp_path, preset="tiny", steps=2, checkpoint_every=2), data=digits, show_progress=False)
    before = final_tensors(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(resume, "save_checkpoint", crash)  # dies after state.safetensors was written
    with pytest.raises(OSError, match="disk full"):
        train(config(tmp_path, preset="tiny", steps=4, checkpoint_every=4, resume="latest"), data=digits)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_00000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_bitwise_equal(before, final_tensors(tmp_path))


def test_leftovers_of_a_killed_writer_are_ignored_and_cleaned(tmp_path, digits):
    train(config(tmp_path, preset="tiny", steps=1, checkpoint_every=1), data=digits, show_progress=False)
    partial = tmp_path / "checkpoints" / ".tmp-step_00000009.abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert resolve_checkpoint(tmp_path).name == "step_00000001"
    assert clean_partial(tmp_path) == 1 and not partial.exists()


def _train_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "inkwash",
        "train",
        "--data",
        "digits",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_checkpoints(out: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(step_dirs(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_kill_9_during_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    """Checkpoint every step, so a kill lands in or near a write; the newest complete checkpoint
    must load, and --resume latest must continue from it."""
    out = tmp_path / "run"
    for round_index, delay in enumerate((0.0, 0.37)):
        args = ["--steps", "100000", "--checkpoint-every", "1", "--keep-last", "2"]
        if round_index:
            args += ["--resume", "latest"]
        process = subprocess.Popen(
            _train_command(out, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_for_checkpoints(out, 2 if round_index == 0 else 1, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = resolve_checkpoint(out)
        state = load_state(latest / "state.safetensors")
        assert latest.name == f"step_{state.step:08d}"
        for name in FILES:
            assert load_tensors(latest / name)
    result = train(TrainConfig(out=str(out), preset="tiny", batch_size=4, steps=state.step + 2, resume="latest"))
    assert result.steps == state.step + 2


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "100000", "--checkpoint-every", "50", "--log-every", "1"]
    process = subprocess.Popen(_train_command(out, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoints(out, 1, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert b"stopped by SIGTERM" in stderr and b"--resume latest" in stderr
    stopped_at = int(stdout.decode().split("trained to step ")[1].split()[0])
    assert stopped_at > 50  # it ran past the first periodic checkpoint before the signal
    newest = resolve_checkpoint(out)
    assert newest.name == f"step_{stopped_at:08d}"  # the stop wrote its own checkpoint
    assert load_state(newest / "state.safetensors").step == stopped_at
