import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "inkwash", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_clean_error(result, fragment):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "train",
        "--data",
        "digits",
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "trained to step 4" in result.stdout
    return out


def test_missing_data_folder(tmp_path):
    result = run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert_clean_error(result, "data folder not found")


def test_folder_of_only_broken_files(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"broken")
    (tmp_path / "bad" / "y.jpg").write_bytes(b"")
    result = run_cli("train", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no readable images" in errors[0]


def test_unknown_sampler(trained_run, tmp_path):
    result = run_cli("sample", "--checkpoint", str(trained_run), "--out", str(tmp_path), "--sampler", "bogus")
    assert_clean_error(result, "unknown sampler 'bogus'")


def test_missing_checkpoint_directory(tmp_path):
    result = run_cli("sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert_clean_error(result, "checkpoint directory not found")


def test_directory_without_checkpoint(tmp_path):
    result = run_cli("sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_clean_error(result, "not an inkwash run directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--data", "digits", "--out", "x", "--steps", "0"], "positive integer"),
        (["train", "--data", "digits", "--out", "x", "--lr", "-1"], "positive number"),
        (["train", "--data", "digits", "--out", "x", "--preset", "huge"], "invalid choice"),
        (["train", "--data", "digits", "--out", "x", "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
        (["train", "--data", "digits", "--out", "x", "--input-perturbation", "-0.1"], "number >= 0"),
        (["train", "--data", "digits", "--out", "x", "--input-perturbation", "2"], "--input-perturbation must be in"),
        (["sample", "--checkpoint", "x", "--out", "y", "--eta", "nan"], "number >= 0"),
        (["sample", "--checkpoint", "x", "--out", "y", "--schedule", "weird"], "invalid choice"),
        (["sample", "--checkpoint", "x", "--out", "y", "--precision", "fp8"], "invalid choice"),
        (["sample", "--checkpoint", "x", "--out", "y", "--device", "tpu"], "invalid choice"),
        (["noise", "--data", "digits", "--out", "n.png", "--t", "0,2000"], "0..1000"),
        (["noise", "--out", "n.png"], "one of the arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_errors(args, fragment):
    assert_clean_error(run_cli(*args), fragment)


@pytest.mark.parametrize("command", ["train", "sample", "noise", "samplers", "demo", "bench samplers"])
def test_help_has_examples(command, capsys):
    from inkwash.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"inkwash {command}" in out


def test_sample_writes_every_output(trained_run, tmp_path):
    out = tmp_path / "samples"
    result = run_cli(
        "sample",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(out),
        "--sampler",
        "DDIM",
        "--steps",
        "3",
        "--num-images",
        "5",
        "--batch-size",
        "2",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "3 model evaluations per image" in result.stdout
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (5, 16, 16, 1) and samples.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(out / "000003.png")), samples[3, ..., 0])
    for name in ("grid.png", "reverse.png", "sampling.json"):
        assert (out / name).is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sample_in_low_precision_records_it(trained_run, tmp_path, precision):
    out = tmp_path / "samples"
    common = ["--checkpoint", str(trained_run), "--steps", "3", "--num-images", "3", "--device", "cpu"]
    result = run_cli("sample", *common, "--out", str(out), "--precision", precision)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sampling.json").read_text())
    assert summary["precision"] == precision and summary["device"] == "cpu"
    exact = run_cli("sample", *common, "--out", str(tmp_path / "exact"))
    assert exact.returncode == 0, exact.stderr
    low, full = (np.load(d / "samples.npz")["samples"].astype(int) for d in (out, tmp_path / "exact"))
    assert np.abs(low - full).mean() <= 3  # on 0..255: the same images, up to the network's rounding


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_sample_on_a_missing_gpu_is_a_one_line_error(trained_run, tmp_path):
    result = run_cli("sample", "--checkpoint", str(trained_run), "--out", str(tmp_path), "--device", "cuda")
    assert_clean_error(result, "sees no GPU")


def test_sample_rejects_too_many_steps(trained_run, tmp_path):
    result = run_cli("sample", "--checkpoint", str(trained_run), "--out", str(tmp_path), "--steps", "1001")
    assert_clean_error(result, "at most 1000")


def test_noise_strip(tmp_path):
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "in.png")
    result = run_cli(
        "noise",
        "--image",
        str(tmp_path / "in.png"),
        "--out",
        str(tmp_path / "s.png"),
        "--t",
        "0,500,1000",
        "--image-size",
        "16",
    )
    assert result.returncode == 0, result.stderr
    strip = Image.open(tmp_path / "s.png")
    assert strip.width > 3 * 64 and strip.height >= 64
    assert_clean_error(
        run_cli("noise", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "s.png")), "image not found"
    )
    (tmp_path / "bad.png").write_bytes(b"xx")
    assert_clean_error(
        run_cli("noise", "--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "s.png")), "cannot read image"
    )


def test_samplers_lists_every_sampler():
    from inkwash.sampling.samplers import SAMPLERS

    result = run_cli("samplers")
    assert result.returncode == 0
    for info in SAMPLERS.values():
        assert info.id in result.stdout and info.display_name in result.stdout


@pytest.mark.parametrize(
    ("sampler", "extra", "nfe"),
    [
        ("Euler a", [], 3),
        ("heun", ["--schedule", "karras"], 5),
        ("dpmpp_2m", ["--schedule", "exponential"], 3),
        ("plms", [], 4),
        ("unipc", ["--schedule", "uniform"], 3),
        ("dpmpp_sde", ["--eta", "0.5"], 5),
    ],
)
def test_sample_with_any_sampler_reports_its_nfe(trained_run, tmp_path, sampler, extra, nfe):
    result = run_cli(
        "sample",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(tmp_path),
        "--sampler",
        sampler,
        "--steps",
        "3",
        "--num-images",
        "2",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    assert f"{nfe} model evaluations per image" in result.stdout


def test_option_that_does_not_apply_to_the_sampler(trained_run, tmp_path):
    result = run_cli(
        "sample", "--checkpoint", str(trained_run), "--out", str(tmp_path), "--sampler", "heun", "--eta", "1"
    )
    assert_clean_error(result, "--eta does not apply to the Heun sampler")


def test_img2img_and_inpainting_from_the_cli(trained_run, tmp_path):
    pixels = (np.random.RandomState(0).rand(16, 16) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "same"
    result = run_cli(
        "sample",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(out),
        "--init-image",
        str(tmp_path / "init.png"),
        "--strength",
        "0",
        "--num-images",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "0 model evaluations" in result.stdout
    assert np.array_equal(np.load(out / "samples.npz")["samples"][..., 0], np.stack([pixels, pixels]))
    out = tmp_path / "inpaint"
    result = run_cli(
        "sample",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(out),
        "--init-image",
        str(tmp_path / "init.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--strength",
        "1",
        "--sampler",
        "dpmpp_2m",
        "--steps",
        "3",
        "--num-images",
        "2",
    )
    assert result.returncode == 0, result.stderr
    samples = np.load(out / "samples.npz")["samples"][..., 0]
    assert np.array_equal(samples[:, :, 8:], np.stack([pixels, pixels])[:, :, 8:])
    assert_clean_error(
        run_cli("sample", "--checkpoint", str(trained_run), "--out", str(out), "--mask", str(tmp_path / "mask.png")),
        "--mask needs --init-image",
    )


def test_v_prediction_with_zero_terminal_snr(tmp_path):
    run = tmp_path / "v"
    result = run_cli(
        "train",
        "--data",
        "digits",
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--prediction",
        "v",
        "--zero-terminal-snr",
        "--beta-schedule",
        "sigmoid",
    )
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "sample",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "s"),
        "--sampler",
        "euler_ancestral",
        "--steps",
        "3",
        "--num-images",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "3 model evaluations" in result.stdout
    assert_clean_error(
        run_cli("train", "--data", "digits", "--out", str(run), "--zero-terminal-snr"),
        "--zero-terminal-snr needs --prediction v or x0",
    )


# --- output folders that cannot be created or written: one line naming the path and the reason ---


def assert_one_error_line(result, pattern: str) -> None:
    """Exit status 1 and one error line matching ``pattern`` (progress bars may have run before it)."""
    import re

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.match(pattern, errors[0]), result.stderr


TRAIN_TINY = ("--data", "digits", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "2")


def run_cli_limited(*args, max_file_bytes: int):
    """The CLI with files capped at ``max_file_bytes``: writes past it fail as on a full disk (EFBIG),
    and this works for root too, whom permissions do not stop."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "inkwash", *args], capture_output=True, text=True, timeout=300, preexec_fn=limit
    )


@pytest.mark.parametrize(
    "command",
    [
        ("train", *TRAIN_TINY, "--out", "{bad}/run"),
        ("sample", "--checkpoint", "{run}", "--steps", "2", "--num-images", "2", "--out", "{bad}/samples"),
        ("noise", "--data", "digits", "--out", "{bad}/strip.png"),
        (
            "eval",
            "--checkpoint",
            "{run}",
            "--reference",
            "digits",
            "--num-samples",
            "4",
            "--steps",
            "2",
            "--features",
            "random",
            "--json",
            "{bad}/eval.json",
        ),
    ],
    ids=["train", "sample", "noise", "eval"],
)
@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_an_output_folder_that_cannot_be_created_is_one_line(trained_run, tmp_path, command, where):
    if where == "proc":
        bad = "/proc/inkwash-x"  # the issue's own example: no folder can be made there, even by root
    else:
        (tmp_path / "file").write_text("not a folder")
        bad = str(tmp_path / "file")
    args = [part.format(bad=bad, run=trained_run) for part in command]
    result = run_cli(*args)
    assert result.returncode == 1
    reason = "No such file or directory" if where == "proc" else "(Not a directory|a file is in the way of a folder)"
    assert_one_error_line(result, rf"inkwash {command[0]}: error: cannot use {bad}\S*: {reason}$")


def test_a_full_disk_while_sampling_is_one_line_and_names_the_file(trained_run, tmp_path):
    out = tmp_path / "full"
    result = run_cli_limited(
        "sample",
        "--checkpoint",
        str(trained_run),
        "--out",
        str(out),
        "--steps",
        "2",
        "--num-images",
        "2",
        max_file_bytes=64,
    )
    assert_one_error_line(result, rf"inkwash sample: error: cannot write {out}/\S+: File too large$")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written temporaries left


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TRAIN_TINY, "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000002").iterdir()}
    result = run_cli_limited(
        "train",
        *TRAIN_TINY[:-4],
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--resume",
        "latest",
        "--out",
        str(out),
        max_file_bytes=4096,
    )
    assert_one_error_line(result, rf"inkwash train: error: cannot write {out}/checkpoints/\S+: File too large$")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # nothing half-made
    after = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000002").iterdir()}
    assert after == before


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root writes through permissions; the file-size tests above cover root",
)
def test_a_read_only_folder_is_one_line(trained_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli("sample", "--checkpoint", str(trained_run), "--out", str(locked / "s"), "--steps", "2")
        assert_one_error_line(result, rf"inkwash sample: error: cannot write {locked}/s\S*: Permission denied$")
    finally:
        locked.chmod(0o700)
