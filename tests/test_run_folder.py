"""One run per folder: a fresh run never mixes with, prunes or cleans up another run's checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inkwash.checkpoint import CONFIG_FILE, step_dirs
from inkwash.errors import InkwashError
from inkwash.training import run_folder
from inkwash.training.loop import TrainConfig, train
from inkwash.training.run_folder import RunLock, claim_run_folder


def tiny(out, **overrides) -> TrainConfig:
    settings = dict(out=str(out), preset="tiny", steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def names(run_dir: Path) -> list[str]:
    return [path.name for path in step_dirs(run_dir)]


def run_id(checkpoint: Path) -> str:
    return json.loads((checkpoint / CONFIG_FILE).read_text())["run_id"]


@pytest.fixture
def old_run(tmp_path):
    """A finished run of 6 steps: the case the bug was about is a new, shorter run in its folder."""
    out = tmp_path / "run"
    train(tiny(out, steps=6), show_progress=False)
    assert names(out) == ["step_00000002", "step_00000004", "step_00000006"]
    return out


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(old_run):
    before = {path.name: run_id(path) for path in step_dirs(old_run)}
    with pytest.raises(InkwashError, match=r"--resume latest.*--overwrite") as caught:
        train(tiny(old_run, steps=2), show_progress=False)
    assert "\n" not in str(caught.value) and "step_00000006" in str(caught.value)
    assert {path.name: run_id(path) for path in step_dirs(old_run)} == before  # untouched


def test_overwrite_replaces_the_old_run_whole(old_run, capsys):
    old_id = run_id(step_dirs(old_run)[-1])
    result = train(tiny(old_run, steps=2, overwrite=True), show_progress=False)
    assert names(old_run) == ["step_00000002"]  # the old step_4 and step_6 are gone, not kept as "newer"
    assert run_id(step_dirs(old_run)[0]) != old_id
    assert result.checkpoint == step_dirs(old_run)[0]
    log_steps = [line.split(",")[0] for line in (old_run / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == ["2"]  # the log is the new run's alone (log_every 10: the last step only)
    assert not [p for p in old_run.parent.iterdir() if run_folder.ASIDE_MARK in p.name]
    assert "removed the previous run" in capsys.readouterr().out


def test_resuming_the_folders_own_run_needs_no_overwrite(old_run):
    result = train(tiny(old_run, steps=8, resume="latest"), show_progress=False)
    assert result.steps == 8 and names(old_run)[-1] == "step_00000008"
    resumed_from_path = train(
        tiny(old_run, steps=10, resume=str(old_run / "checkpoints" / "step_00000008")), show_progress=False
    )
    assert resumed_from_path.steps == 10
    assert len({run_id(path) for path in step_dirs(old_run)}) == 1  # one lineage across resumes


def test_resuming_another_folders_checkpoint_into_this_one_is_refused(old_run, tmp_path):
    other = tmp_path / "other"
    train(tiny(other, steps=2), show_progress=False)
    with pytest.raises(InkwashError, match="--overwrite"):
        train(tiny(old_run, steps=4, resume=str(other)), show_progress=False)
    assert names(old_run) == ["step_00000002", "step_00000004", "step_00000006"]


def test_a_crash_after_the_old_run_is_moved_aside_leaves_it_whole(old_run, monkeypatch):
    files_before = sorted(str(p.relative_to(old_run)) for p in old_run.rglob("*") if p.name != ".lock")

    def killed(path, ignore_errors=False):
        if run_folder.ASIDE_MARK in str(path) and Path(path).exists():
            raise KeyboardInterrupt  # the process dies right after the atomic rename
        return None

    monkeypatch.setattr(run_folder.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        claim_run_folder(old_run, None, resuming=False, overwrite=True)
    assert names(old_run) == []  # no mix: the folder holds nothing of the old run
    (aside,) = [p for p in old_run.parent.iterdir() if run_folder.ASIDE_MARK in p.name]
    files_aside = sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.name != ".lock")
    assert files_aside == files_before  # the old run is whole, out of sight


def test_a_failure_before_the_rename_leaves_the_old_run_in_place(old_run, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_folder.os, "replace", refuse)
    with pytest.raises(OSError):
        claim_run_folder(old_run, None, resuming=False, overwrite=True)
    assert names(old_run) == ["step_00000002", "step_00000004", "step_00000006"]
    RunLock(old_run).release()  # and the lock was released


def test_overwrite_will_not_move_the_current_directory(old_run, monkeypatch):
    monkeypatch.chdir(old_run)
    with pytest.raises(InkwashError, match="current directory"):
        train(tiny(old_run, overwrite=True), show_progress=False)
    assert len(names(old_run)) == 3


def test_a_folder_in_use_is_refused_and_its_partial_files_are_left_alone(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    held = RunLock(out)  # another training process owns the folder
    writing = out / "checkpoints" / ".tmp-step_00000002.abc123"
    writing.mkdir(parents=True)
    try:
        with pytest.raises(InkwashError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
            train(tiny(out, resume="latest"), show_progress=False)
        assert writing.is_dir()  # its in-progress checkpoint survives
    finally:
        held.release()
    train(tiny(out, steps=2, resume="latest"), show_progress=False)  # once free, the dead writer's file goes
    assert not writing.exists() and names(out) == ["step_00000002"]


def test_pruning_only_removes_the_runs_own_checkpoints(old_run):
    # A checkpoint of another run with a higher step (left by an older inkwash in a shared folder).
    foreign = old_run / "checkpoints" / "step_00000100"
    foreign.mkdir()
    config = json.loads((old_run / "checkpoints" / "step_00000006" / CONFIG_FILE).read_text())
    (foreign / CONFIG_FILE).write_text(json.dumps({**config, "run_id": "another-run", "step": 100}))
    own = old_run / "checkpoints" / "step_00000006"
    train(tiny(old_run, steps=10, keep_last=1, resume=str(own)), show_progress=False)
    assert names(old_run) == ["step_00000010", "step_00000100"]  # keep_last=1 of its own; the other kept


def test_cli_refusal_is_one_line(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "inkwash", "train", "--data", "digits", "--out", str(out), "--preset", "tiny"]
    command += ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command, capture_output=True, env=env, timeout=300).returncode == 0
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "--resume latest" in again.stderr and "--overwrite" in again.stderr
    replaced = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, env=env, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
