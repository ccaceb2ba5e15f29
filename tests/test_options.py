"""Options are declared once, on dataclass fields: the flags, their defaults, help and checks come from them."""

import argparse
import json
from dataclasses import MISSING, asdict, fields

import pytest

from inkwash.commands.cli import COMMANDS, build_parser, main, make_options
from inkwash.errors import InkwashError
from inkwash.evaluation.report import EvalOptions
from inkwash.options import Spec, check_value, kind, parse_text, specs
from inkwash.sampling.options import SampleOptions
from inkwash.training.config import TrainConfig

# Every flag spelling that inkwash documented before the options were generated from the dataclasses.
DOCUMENTED = {
    "train": "--data --data-dir --download --class-cond --resize-mode --hflip --out --preset --steps --batch-size "
    "--lr --image-size --dropout --seed --checkpoint-every --beta-schedule --prediction --zero-terminal-snr "
    "--warmup-steps --ema-decay --lr-schedule --weight-decay --adam-beta1 --adam-beta2 --grad-accum "
    "--min-snr-gamma --input-perturbation --precision --device --channels-last --compile --max-nonfinite "
    "--cond-drop --resume --overwrite --deterministic --no-deterministic --keep-last --log-every --sample-every "
    "--tensorboard --eval-every --eval-metrics --eval-samples --eval-reference",
    "sample": "--checkpoint --out --sampler --steps --schedule --eta --variance --s-churn --rho --init-image "
    "--strength --mask --num-images --batch-size --seed --no-ema --no-clip --class --guidance-scale "
    "--grid-by-class --per-class --device --precision",
    "noise": "--image --data --out --t --image-size --beta-schedule --seed",
    "bench samplers": "--gmm --samplers --steps --schedule --beta-schedule --num-samples --seed --json "
    "--save-samples --plot",
    "eval": "--samples --checkpoint --reference --metrics --features --inception-weights --num-samples --json "
    "--sampler --steps --schedule --eta --seed --batch-size --no-ema --nll-terms --guidance-scale --device "
    "--precision",
    "demo": "--out --minutes --seed --eval-samples",
}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in command.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def options_for(*argv: str):
    args = build_parser().parse_args(argv)
    return make_options(args.run_command, args)


@pytest.mark.parametrize("command", list(DOCUMENTED))
def test_every_documented_flag_is_still_there(command):
    spellings = {flag for action in subparser(command)._actions for flag in action.option_strings}
    assert set(DOCUMENTED[command].split()) <= spellings


@pytest.mark.parametrize(("command", "cls"), [("train", TrainConfig), ("sample", SampleOptions), ("eval", EvalOptions)])
def test_every_option_of_the_library_has_its_flag(command, cls):
    dests = {action.dest for action in subparser(command)._actions}
    on_the_command_line = {spec.name for spec in specs(cls) if spec.meta.get("cli", True)}
    assert on_the_command_line <= dests
    assert {spec.name for spec in specs(cls)} - on_the_command_line <= {
        "grad_clip",
        "time_limit",
        "strip_points",
        "show_progress",
    }


def test_the_command_line_defaults_are_the_dataclass_defaults():
    assert options_for("train", "--data", "digits", "--out", "r") == TrainConfig(data="digits", out="r")
    assert options_for("sample", "--checkpoint", "c", "--out", "o") == SampleOptions(checkpoint="c", out="o")
    assert options_for("eval", "--samples", "s", "--reference", "digits") == EvalOptions(
        reference="digits", samples="s"
    )
    assert TrainConfig().steps == 3000  # one default, the one --help has always shown


def test_special_spellings_set_their_fields():
    options = options_for("sample", "--checkpoint", "c", "--out", "o", "--class", "3", "--no-ema", "--no-clip")
    assert (options.class_label, options.use_ema, options.clip_denoised) == ("3", False, False)
    assert options_for("sample", "--checkpoint", "c", "--out", "o", "--sampler", "Euler a").sampler == "euler_ancestral"
    assert options_for("sample", "--checkpoint", "c", "--out", "o", "--sampler", "DPM++ 2M").sampler == "dpmpp_2m"
    train = ("train", "--data", "digits", "--out", "r")
    assert options_for(*train).deterministic is True
    assert options_for(*train, "--no-deterministic").deterministic is False
    assert options_for(*train, "--no-deterministic", "--deterministic").deterministic is True
    evaluate = options_for("eval", "--checkpoint", "r", "--reference", "digits", "--metrics", "fid, nll", "--no-ema")
    assert evaluate.metrics == ("fid", "nll") and evaluate.use_ema is False
    assert options_for("noise", "--data", "digits", "--out", "n.png", "--t", "0,500").t == (0, 500)
    assert options_for("bench", "samplers", "--gmm", "gmm2d", "--steps", "5,10").steps == (5, 10)


def test_help_shows_every_default(capsys):
    for command, cls in (("train", TrainConfig), ("sample", SampleOptions), ("eval", EvalOptions)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        for spec in specs(cls):
            if not spec.meta.get("cli", True) or spec.type is bool or spec.default in (None, MISSING):
                continue
            shown = ",".join(map(str, spec.default)) if spec.sequence else str(spec.default)
            assert spec.meta.get("required") or f"(default: {shown}" in out, (command, spec.name)
    for command in COMMANDS:
        assert COMMANDS[command].examples or COMMANDS[command].commands


def test_sample_options_metadata_are_plain_data():
    """The HTTP request schema is built from SampleOptions: types, defaults, help and choices, all plain."""
    for spec in specs(SampleOptions):
        assert spec.type in (int, float, str, bool)
        assert isinstance(spec.meta.get("help", ""), str)
        json.dumps(None if spec.default is MISSING else spec.default)
        for key in ("choices", "minimum", "exclusive_minimum", "maximum", "exclusive_maximum"):
            if key in spec.meta:
                json.dumps(spec.meta[key])
        assert set(spec.meta) <= {
            "help",
            "flag",
            "choices",
            "minimum",
            "exclusive_minimum",
            "maximum",
            "exclusive_maximum",
            "parse",
            "metavar",
            "cli",
        }
    sampler = next(spec for spec in specs(SampleOptions) if spec.name == "sampler")
    assert "ddim" in sampler.meta["choices"] and sampler.meta["parse"]("Euler a") in sampler.meta["choices"]
    assert [f.name for f in fields(SampleOptions)][:2] == ["checkpoint", "out"]  # still positional-first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TrainConfig(steps=0), "--steps must be a positive integer, got 0"),
        (TrainConfig(lr=float("nan")), "--lr must be a positive number, got nan"),
        (TrainConfig(adam_beta2=1.0), "--adam-beta2 must be in [0, 1), got 1.0"),
        (TrainConfig(input_perturbation=-0.5), "--input-perturbation must be in [0, 1], got -0.5"),
        (TrainConfig(image_size=2048), "--image-size must be in 4..1024, got 2048"),
        (TrainConfig(preset="huge"), "--preset must be one of digits, rgb32, tiny, got 'huge'"),
        (TrainConfig(steps="10"), "--steps must be a positive integer, got '10'"),
        (TrainConfig(grad_clip=0.0), "grad_clip must be a positive number, got 0.0"),  # no flag: its field name
        (TrainConfig(zero_terminal_snr=True), "--zero-terminal-snr needs --prediction v or x0"),
        (SampleOptions("c", "o", sampler="bogus"), "--sampler: unknown sampler 'bogus'"),
        (SampleOptions("c", "o", strength=1.5), "--strength must be in [0, 1], got 1.5"),
        (SampleOptions("c", "o", guidance_scale=-1.0), "--guidance-scale must be a number >= 0, got -1.0"),
        (EvalOptions("digits"), "give exactly one of --samples and --checkpoint"),
        (EvalOptions("digits", samples="s", checkpoint="c"), "give exactly one of --samples and --checkpoint"),
        (EvalOptions("digits", samples="s", metrics=("fid", "bogus")), "--metrics must be one of fid, kid"),
        (
            EvalOptions("digits", samples="s", metrics=()),
            "--metrics must be one or more of fid, kid, pr, swd, nll, comma-separated, got ()",
        ),
    ],
)
def test_validate_names_the_option(options, message):
    with pytest.raises(InkwashError) as raised:
        options.validate()
    assert str(raised.value).startswith(message)


def test_valid_options_pass():
    TrainConfig().validate()
    TrainConfig(prediction="v", zero_terminal_snr=True, dropout=0.0, min_snr_gamma=5, lr=1).validate()
    SampleOptions("c", "o", sampler="Euler a", eta=0.0, class_label="all").validate()
    EvalOptions("digits", checkpoint="r", metrics=["fid", "nll"]).validate()


def spec_of(cls, name) -> Spec:
    return next(spec for spec in specs(cls) if spec.name == name)


def test_text_becomes_a_value_of_the_options_kind():
    steps, lr, eta = spec_of(TrainConfig, "steps"), spec_of(TrainConfig, "lr"), spec_of(SampleOptions, "eta")
    assert (kind(steps), kind(lr), kind(eta)) == ("a positive integer", "a positive number", "a number >= 0")
    assert parse_text(steps, "12") == 12 and parse_text(lr, "1e-3") == 0.001
    for spec, text in ((steps, "0"), (steps, "1.5"), (lr, "-1"), (lr, "inf"), (eta, "nan"), (eta, "x")):
        with pytest.raises(ValueError, match=f"expected {kind(spec)}, got '{text}'"):
            parse_text(spec, text)
    beta2 = spec_of(TrainConfig, "adam_beta2")
    assert parse_text(beta2, "1") == 1.0  # the upper limit is validate()'s
    assert check_value(beta2, 1.0, "--adam-beta2") == "--adam-beta2 must be in [0, 1), got 1.0"
    metrics = spec_of(EvalOptions, "metrics")
    with pytest.raises(ValueError, match="unknown metrics 'bogus'; choose from fid, kid, pr, swd, nll"):
        parse_text(metrics, "fid,bogus")


@pytest.mark.parametrize(
    ("argv", "status", "fragment"),
    [
        (
            ["train", "--data", "digits", "--out", "r", "--steps", "0"],
            2,
            "argument --steps: expected a positive integer",
        ),
        (["train", "--out", "r"], 2, "the following arguments are required: --data"),
        (["train", "--data", "digits", "--out", "r", "--cond-drop", "1"], 1, "--cond-drop must be in [0, 1), got 1.0"),
        (["sample", "--checkpoint", "c", "--out", "o", "--strength", "2"], 1, "--strength must be in [0, 1], got 2.0"),
        (["sample", "--checkpoint", "c", "--out", "o", "--per-class", "0"], 2, "expected a positive integer"),
        (["eval", "--samples", "s", "--reference", "digits", "--nll-terms", "0"], 2, "expected a positive integer"),
        (["demo", "--minutes", "0"], 2, "argument --minutes: expected a positive number, got '0'"),
        (["bench", "samplers", "--gmm", "gmm2d", "--steps", "5,x"], 2, "comma-separated integers in 1..1000"),
    ],
)
def test_bad_values_are_one_line_errors(argv, status, fragment, capsys):
    try:
        seen = main(argv)
    except SystemExit as exc:
        seen = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert seen == status and len(err) == 1 and fragment in err[0], err
    assert err[0].startswith(f"inkwash {argv[0]}")


def test_options_round_trip_through_asdict():
    config = options_for("train", "--data", "digits", "--out", "r", "--steps", "5", "--min-snr-gamma", "5")
    assert TrainConfig(**asdict(config)) == config
