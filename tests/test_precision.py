from pathlib import Path

import pytest
import torch

from inkwash.core import precision as precision_module
from inkwash.core.precision import (
    PRECISIONS,
    deterministic_mode,
    native_bf16_cpu,
    precision_context,
    precision_warning,
    resolve_precision,
)


def test_auto_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    monkeypatch.delenv("INKWASH_PRECISION", raising=False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected
        assert resolve_precision("auto", torch.device("cuda")) == "fp32"  # launch-bound there: measured slower
        for name in PRECISIONS:  # a named precision is kept whatever the machine
            assert resolve_precision(name, "cpu") == name
        with precision_context("auto", "cpu"):
            assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == PRECISIONS[expected]


def test_auto_follows_the_machine_and_the_environment(monkeypatch):
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if flags:  # torch's own detection agrees with the kernel's flags
        assert native_bf16_cpu() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setenv("INKWASH_PRECISION", "fp16")
    assert resolve_precision("auto", "cpu") == "fp16"
    monkeypatch.setenv("INKWASH_PRECISION", "fp8")
    with pytest.raises(ValueError, match="INKWASH_PRECISION must be one of"):
        resolve_precision("auto", "cpu")


def test_training_records_what_auto_picked(monkeypatch, tmp_path):
    import json

    import inkwash

    monkeypatch.setenv("INKWASH_PRECISION", "bf16")
    result = inkwash.train(data="digits", out=str(tmp_path / "run"), preset="tiny", steps=2, batch_size=8,
                           image_size=16, show_progress=False)  # fmt: skip
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["train"]["precision"] == "bf16"


def test_fp32_is_no_autocast_and_the_others_autocast_to_their_dtype():
    conv = torch.nn.Conv2d(1, 1, 3)
    x = torch.randn(1, 1, 5, 5)
    with precision_context("fp32", "cpu"):
        assert conv(x).dtype == torch.float32
    for name in ("bf16", "fp16"):
        with precision_context(name, torch.device("cpu")):
            assert conv(x).dtype == PRECISIONS[name]
            assert (x + 1).dtype == torch.float32  # element-wise arithmetic is untouched


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        precision_context("fp8", "cpu")


def test_warning_only_for_low_precision_on_a_cpu_without_its_kernels():
    cpu = torch.device("cpu")
    assert precision_warning("fp32", cpu) is None
    assert precision_warning("bf16", torch.device("cuda")) is None
    has_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    warning = precision_warning("bf16", cpu)
    assert (warning is None) == has_bf16
    if warning is not None:
        assert "no bf16 convolution kernels" in warning and "--precision bf16" in warning


def _determinism_flags():
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


def test_deterministic_mode_sets_every_cuda_switch_and_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _determinism_flags()
    torch.backends.cudnn.benchmark = True  # as a user who benchmarks might have left it
    try:
        with deterministic_mode(True, torch.device("cuda")):
            assert _determinism_flags() == (True, True, False)
            import os

            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.benchmark is True and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = before[2]
    assert _determinism_flags() == before


def test_deterministic_mode_leaves_the_cpu_and_an_opt_out_alone(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _determinism_flags()
    for enabled, device in ((True, "cpu"), (False, "cuda")):
        with deterministic_mode(enabled, torch.device(device)):
            assert _determinism_flags() == before
    import os

    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_training_runs_in_deterministic_mode_unless_told_not_to(monkeypatch, tmp_path):
    import inkwash.training.loop as trainer

    seen = []
    original = trainer.deterministic_mode

    def spy(enabled, device):
        seen.append((enabled, device.type))
        return original(enabled, device)

    monkeypatch.setattr(trainer, "deterministic_mode", spy)
    for index, flag in enumerate((True, False)):
        config = trainer.TrainConfig(out=str(tmp_path / str(index)), preset="tiny", steps=1, batch_size=2, device="cpu")
        config.deterministic = flag
        trainer.train(config, show_progress=False)
    assert seen == [(True, "cpu"), (False, "cpu")]
    assert trainer.TrainConfig().deterministic is True  # on by default
