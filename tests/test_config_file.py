"""``inkwash train --config FILE``: options from a TOML, YAML or JSON file (a run's own config.json too),
with the flags given on the command line overriding the file."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from inkwash.commands.cli import build_parser, main, make_options
from inkwash.training.config import TrainConfig


def train_options(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(["train", *argv])
    return make_options(args.run_command, args)


def run_main(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_toml_yaml_and_json_give_the_same_options(tmp_path):
    (tmp_path / "a.toml").write_text(
        'data = "digits"\nout = "runs/a"\npreset = "tiny"\nbatch-size = 8\nlr = 2e-3\n'
        "min_snr_gamma = 5\nhflip = true\nsample_every = 10\n"
    )
    (tmp_path / "a.yaml").write_text(  # PyYAML reads 2e-3 as text: it is parsed as on the command line
        "data: digits\nout: runs/a\npreset: tiny\nbatch_size: 8\nlr: 2e-3\nmin_snr_gamma: 5\nhflip: true\n"
        "sample_every: 10\n"
    )
    expected = TrainConfig(
        data="digits",
        out="runs/a",
        preset="tiny",
        batch_size=8,
        lr=2e-3,
        min_snr_gamma=5.0,
        hflip=True,
        sample_every=10,
    )
    (tmp_path / "a.json").write_text(json.dumps(asdict(expected)))
    for name in ("a.toml", "a.yaml", "a.json"):
        options = train_options("--config", str(tmp_path / name))
        assert options == expected, name
        assert isinstance(options.min_snr_gamma, float)


def test_flags_override_the_file(tmp_path):
    (tmp_path / "c.toml").write_text('data = "digits"\nout = "runs/a"\nsteps = 50\nseed = 3\ndeterministic = false\n')
    options = train_options("--config", str(tmp_path / "c.toml"), "--steps", "7", "--out", "runs/b", "--deterministic")
    assert (options.steps, options.out, options.seed, options.deterministic) == (7, "runs/b", 3, True)
    assert train_options("--out", "o", "--config", str(tmp_path / "c.toml")).out == "o"  # wherever the flag stands


def test_a_run_config_reads_its_train_section(tmp_path):
    saved = asdict(TrainConfig(data="digits", out="runs/x", preset="tiny", steps=9, grad_clip=0.5, time_limit=60.0))
    run_config = {"run_id": "r", "unet": {"channels": 8}, "data": {"shape": [1, 16, 16]}, "train": saved, "step": 9}
    (tmp_path / "config.json").write_text(json.dumps(run_config))
    options = train_options("--config", str(tmp_path / "config.json"))
    assert asdict(options) == saved  # options without a flag (grad_clip, time_limit) come from the file too


def test_resume_and_overwrite_come_from_the_command_line_only(tmp_path, capsys):
    saved = asdict(TrainConfig(out="runs/x", resume="latest", overwrite=True))
    (tmp_path / "config.json").write_text(json.dumps({"train": saved}))
    options = train_options("--config", str(tmp_path / "config.json"))
    assert options.resume is None and options.overwrite is False
    err = capsys.readouterr().err
    assert "ignoring resume = 'latest'" in err and "only the command line sets --resume" in err
    assert "ignoring overwrite = True" in err
    options = train_options("--config", str(tmp_path / "config.json"), "--resume", "latest", "--overwrite")
    assert options.resume == "latest" and options.overwrite is True


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("c.toml", "stepz = 3\n", "c.toml: unknown key 'stepz' (did you mean 'steps'?)"),
        ("c.toml", "steps = 0\n", "c.toml: steps must be a positive integer, got 0"),
        ("c.toml", 'steps = "many"\n', "c.toml: steps: expected a positive integer, got 'many'"),
        ("c.toml", "adam_beta2 = 1.0\n", "c.toml: adam_beta2 must be in [0, 1), got 1.0"),
        ("c.toml", 'preset = "huge"\n', "c.toml: preset must be one of digits, rgb32, tiny, got 'huge'"),
        ("c.toml", "hflip = 1\n", "c.toml: hflip must be true or false, got 1"),
        ("c.toml", "steps = [1, 2]\n", "c.toml: steps must be a positive integer, got [1, 2]"),
        ("c.toml", "steps = \n", "cannot parse"),
        ("c.yaml", "steps: [1\n", "cannot parse"),
        ("c.yaml", "- 1\n- 2\n", "must hold a table of options"),
        ("c.json", '{"train": {"lr": -1}}', "c.json: lr must be a positive number, got -1.0"),
        ("c.ini", "steps = 3\n", "a config file ends in .toml, .yaml, .yml, .json"),
    ],
)
def test_bad_files_are_one_line_errors_naming_the_key(tmp_path, capsys, name, text, fragment):
    (tmp_path / name).write_text(text)
    status, _, err = run_main(["train", "--data", "digits", "--out", "o", "--config", str(tmp_path / name)], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("inkwash train: error: "), err
    assert fragment in lines[0]


def test_a_missing_file_and_missing_options(tmp_path, capsys):
    status, _, err = run_main(["train", "--config", str(tmp_path / "none.toml")], capsys)
    assert status == 2 and "config file not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "c.toml").write_text('data = "digits"\n')
    status, _, err = run_main(["train", "--config", str(tmp_path / "c.toml")], capsys)
    assert status == 2 and "the following arguments are required: --out" in err


def test_a_cross_option_rule_still_applies_to_a_file(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('data = "digits"\nout = "o"\nzero_terminal_snr = true\n')
    status, _, err = run_main(["train", "--config", str(tmp_path / "c.toml")], capsys)
    assert status == 1 and "--zero-terminal-snr needs --prediction v or x0" in err


def weights(checkpoint):
    return {name: load_file(checkpoint / name) for name in ("model.safetensors", "ema.safetensors")}


def test_training_again_from_a_runs_config_reproduces_it_bitwise(tmp_path, capsys):
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    # Options off their defaults, so that one the file failed to carry would change the weights.
    recipe = ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--checkpoint-every", "3", "--device", "cpu"]
    recipe += ["--lr", "3e-3", "--warmup-steps", "1", "--seed", "7", "--adam-beta2", "0.99", "--hflip"]
    recipe += ["--input-perturbation", "0.1", "--ema-decay", "0.9", "--log-every", "1"]
    assert run_main(["train", "--data", "digits", "--out", str(first), *recipe], capsys)[0] == 0
    config = first / "checkpoints" / "step_00000003" / "config.json"
    status, _, err = run_main(["train", "--config", str(config), "--out", str(again)], capsys)
    assert status == 0, err
    reference, retrained = weights(config.parent), weights(again / "checkpoints" / "step_00000003")
    for name, tensors in reference.items():
        assert tensors.keys() == retrained[name].keys()
        assert all(torch.equal(tensors[key], retrained[name][key]) for key in tensors), name
    saved = json.loads(config.read_text())["train"]
    assert json.loads((again / "checkpoints" / "step_00000003" / "config.json").read_text())["train"] == {
        **saved,
        "out": str(again),
    }
    # The comparison can fail: a flag that overrides the file's seed trains other weights.
    assert run_main(["train", "--config", str(config), "--out", str(other), "--seed", "8"], capsys)[0] == 0
    changed = weights(other / "checkpoints" / "step_00000003")["model.safetensors"]
    assert not all(torch.equal(changed[key], reference["model.safetensors"][key]) for key in changed)
    # Without --out the file's own run folder is used, and a fresh run refuses to replace it.
    status, _, err = run_main(["train", "--config", str(config)], capsys)
    assert status == 1 and "--resume latest" in err and "--overwrite" in err
