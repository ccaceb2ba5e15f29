import json
import os

import pytest
import torch

from inkwash.checkpoint import (
    load_model,
    load_optimizer_state,
    load_weights,
    read_config,
)
from inkwash.core.unet import UNet, preset
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes
from inkwash.training.loop import TrainConfig, train


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


def test_optimizer_state_round_trip_keeps_every_tensor(tmp_path):
    """Every AdamW state tensor (step, exp_avg, exp_avg_sq) and every group setting comes back exactly."""
    from inkwash.checkpoint import save_checkpoint
    from inkwash.core.schedule import NoiseSchedule
    from inkwash.training.loop import make_optimizer
    from inkwash.training.objectives import diffusion_loss

    torch.manual_seed(0)
    model = UNet(preset("tiny"))
    optimizer = make_optimizer(model, 1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        diffusion_loss(model, NoiseSchedule(), torch.randn(4, 1, 16, 16), generator).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(tmp_path, {}, model, model, optimizer)
    fresh = make_optimizer(UNet(preset("tiny")), 5.0)  # other settings, empty state
    load_optimizer_state(fresh, tmp_path / "optimizer.safetensors")
    saved, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) == len(list(model.parameters()))
    for index, entry in saved["state"].items():
        assert entry.keys() == loaded["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, tensor in entry.items():
            again = loaded["state"][index][name]
            assert again.dtype == tensor.dtype and torch.equal(again, tensor), (index, name)
    assert any(entry["exp_avg_sq"].abs().max() > 0 for entry in saved["state"].values())  # not a trivial state
