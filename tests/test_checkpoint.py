import json
import os

import pytest
import torch

from inkwash.checkpoint import (
    atomic_write_bytes,
    load_model,
    load_optimizer_state,
    load_weights,
    read_config,
)
from inkwash.errors import InkwashError
from inkwash.train import TrainConfig, train
from inkwash.unet import UNet, preset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(
        TrainConfig(out=str(out), preset="tiny", steps=6, batch_size=8, checkpoint_every=3, log_every=2),
        show_progress=False,
    )
    return out


def test_checkpoint_round_trip_is_bitwise(run_dir, tmp_path):
    from inkwash.checkpoint import save_checkpoint

    model, schedule, config = load_model(run_dir, use_ema=False)
    ema, _, _ = load_model(run_dir, use_ema=True)
    save_checkpoint(tmp_path, config, model, ema)
    again, _, _ = load_model(tmp_path, use_ema=False)
    ema_again, _, _ = load_model(tmp_path, use_ema=True)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema_again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert config["step"] == 6
    assert schedule.num_steps == 1000


def test_files_and_config(run_dir):
    assert {"checkpoints", "log.csv", "loss.png"} <= set(os.listdir(run_dir))
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000003", "step_00000006"]
    names = set(os.listdir(run_dir / "checkpoints" / "step_00000006"))
    assert names == {
        "config.json",
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "state.safetensors",
    }
    config = read_config(run_dir)
    assert config["step"] == 6
    assert config["unet"]["base_channels"] == preset("tiny").base_channels
    assert config["prediction"] == "eps"
    assert config["data"]["class_names"] == [str(d) for d in range(10)]


def test_ema_differs_from_raw_weights(run_dir):
    raw, _, _ = load_model(run_dir, use_ema=False)
    ema, _, _ = load_model(run_dir, use_ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), ema.parameters(), strict=True))


def test_optimizer_state_round_trip(run_dir):
    model, _, _ = load_model(run_dir, use_ema=False)
    optimizer = torch.optim.AdamW(model.parameters())
    load_optimizer_state(optimizer, run_dir / "checkpoints" / "step_00000006" / "optimizer.safetensors")
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert float(state[0]["step"]) == 6.0
    assert optimizer.param_groups[0]["lr"] > 0


def test_mismatched_weights_are_a_clear_error(run_dir, tmp_path):
    other = UNet(preset("digits"))
    with pytest.raises(InkwashError, match="does not match the model"):
        load_weights(other, run_dir / "checkpoints" / "step_00000006" / "model.safetensors")


def test_corrupt_files_are_clear_errors(run_dir, tmp_path):
    for name in ("config.json", "model.safetensors", "ema.safetensors"):
        (tmp_path / name).write_bytes((run_dir / "checkpoints" / "step_00000006" / name).read_bytes())
    (tmp_path / "ema.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InkwashError, match="cannot read"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InkwashError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InkwashError, match="not an inkwash"):
        load_model(tmp_path)
    with pytest.raises(InkwashError, match="not found"):
        load_model(tmp_path / "missing")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]
