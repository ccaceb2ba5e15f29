"""benchmarks/throughput.py: its variants, the channels_last layout it times, and a short run end to end on the
CPU in a subprocess, as gpu.sh runs it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_default_to_the_contiguous_layout(throughput):
    assert throughput.precision_variants(False) == [("fp32", "fp32", False, False), ("bf16", "bf16", False, False)]
    names = [v[0] for v in throughput.precision_variants(True, ("bf16",))]
    assert names == ["fp32", "bf16", "bf16 compiled"]


def test_channels_last_twins_every_variant_but_the_fp32_baseline(throughput):
    variants = throughput.precision_variants(True, ("bf16",), ("contiguous", "channels_last"))
    assert variants == [
        ("fp32", "fp32", False, False),
        ("bf16", "bf16", False, False),
        ("bf16 compiled", "bf16", True, False),
        ("bf16, channels_last", "bf16", False, True),
        ("bf16 compiled, channels_last", "bf16", True, True),
    ]


def test_a_channels_last_train_step_feeds_the_network_nhwc(throughput):
    from inkwash.core.schedule import NoiseSchedule
    from inkwash.core.unet import UNet, preset
    from inkwash.training.loop import make_optimizer

    torch.manual_seed(0)
    config = preset("tiny", in_channels=3)  # with one channel both layouts have the same strides
    shape = (config.in_channels, config.image_size, config.image_size)
    for channels_last in (False, True):
        model = UNet(config)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        seen = []
        model.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))  # noqa: B023
        )
        step = throughput.inkwash_train_step(
            model, make_optimizer(model, lr=1e-4), 4, shape, NoiseSchedule(), channels_last=channels_last
        )
        step()
        assert seen == [channels_last]


def test_cudnn_benchmark_mode_is_on_only_during_the_wrapped_call(throughput):
    before = torch.backends.cudnn.benchmark
    seen = []
    throughput.with_cudnn_benchmark(lambda: seen.append(torch.backends.cudnn.benchmark))()
    assert seen == [True] and torch.backends.cudnn.benchmark == before

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        throughput.with_cudnn_benchmark(fails)()
    assert torch.backends.cudnn.benchmark == before


def run_script(*args, timeout=300):
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)


def test_a_bad_memory_format_is_a_one_line_usage_error():
    done = run_script("--memory-formats", "contiguous,nhwc")
    assert done.returncode == 2
    assert "--memory-formats takes contiguous and/or channels_last" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_short_run_times_both_layouts_against_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "throughput.json"
    done = run_script("--preset", "tiny", "--batch-size", "4", "--rounds", "1", "--train-steps", "1",
                      "--sample-steps", "2", "--memory-formats", "contiguous,channels_last",
                      "--cudnn-benchmark", "--memory-batch-sizes", "", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["complete"] and result["memory_formats"] == ["contiguous", "channels_last"]
    assert result["cudnn_benchmark"] is True
    assert set(result["precision"]) == {"fp32", "bf16", "bf16, channels_last"}
    for entry in result["precision"].values():
        assert entry["train_images_per_sec"] > 0 and entry["sample_images_per_sec"] > 0
    assert abs(result["parameters"]["ratio"] - 1) <= 0.02
    assert result["train_ratio"] > 0 and result["sample_ratio"] > 0
    assert "bf16, channels_last" in result["defaults_vs_diffusers"]
    assert "bf16, channels_last" in done.stdout
