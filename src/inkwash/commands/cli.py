"""The ``inkwash`` command line: parsing and dispatch, a thin layer over the library.

Every command's options are the fields of one dataclass (``TrainConfig``, ``SampleOptions``,
``EvalOptions``, and below the few of ``noise``, ``bench samplers`` and ``demo``); ``inkwash.options``
turns the fields into flags, and reads ``inkwash train --config FILE``, so that each option, its
default, help and checks are declared once.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inkwash.commands.export import ExportOptions, cmd_export
from inkwash.core.schedule import BETA_SCHEDULES
from inkwash.errors import InkwashError
from inkwash.evaluation.report import EvalOptions
from inkwash.options import add_arguments, given_options, missing_options, option, read_config_file, specs
from inkwash.progress import close_bars
from inkwash.sampling.options import SampleOptions, schedule_option
from inkwash.serve.config import ServeOptions
from inkwash.training.config import TrainConfig

# Errors that mean the disk or the folder refuses the write, not that a path is wrong.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

DESCRIPTION = "inkwash: train and sample image diffusion models (DDPM family)."

# A run's config.json (training/loop.py's run_config) keeps its TrainConfig under this key.
RUN_CONFIG_SECTION = "train"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(kw_only=True)
class NoiseOptions:
    image: str | None = option(None, "an image file", one_of="source")
    data: str | None = option(None, "use four digits", choices=("digits",), one_of="source")
    out: str = option(help="output PNG")
    t: tuple[int, ...] = option(
        tuple(range(0, 1001, 100)),
        "comma-separated steps in 0..1000 (default: 0,100,...,1000)",
        minimum=0,
        maximum=1000,
    )
    image_size: int = option(64, "side for --image", minimum=1)
    beta_schedule: str = option("linear", choices=BETA_SCHEDULES)
    seed: int = option(0, minimum=0)


@dataclass(kw_only=True)
class BenchOptions:
    gmm: str = option(
        help="a preset (gmm2d; gmm64, on which the default schedules were chosen; gmm48, held out from that "
        "choice) or an .npz with weights, means, stds"
    )
    samplers: str = option("all", "'all' or comma-separated ids")
    steps: tuple[int, ...] = option((5, 10, 20, 50), minimum=1, maximum=1000)
    schedule: str | None = schedule_option("step schedule for every sampler (default: each sampler's own)")
    beta_schedule: str = option("linear", "sigma range", choices=BETA_SCHEDULES)
    num_samples: int = option(10_000, minimum=1)
    seed: int = option(0, minimum=0)
    json: str | None = option(None, "write the results as JSON")
    save_samples: str | None = option(None, "write DIR/<sampler>_<steps>.npy")
    plot: str = option("bench_samplers.png", "PNG of error against NFE")


@dataclass
class DemoOptions:  # the keyword arguments of inkwash.commands.demo.run_demo
    out: str = option("demo_out", "output directory")
    minutes: float = option(5.0, "training time budget", exclusive_minimum=0)
    seed: int = option(0, minimum=0)
    eval_samples: int = option(
        1000,
        "score this many samples of the demo's DDPM sampler (FID, KID, precision/recall) beside the "
        "real-data floor; 0 skips it",
        minimum=0,
    )
    eval_draws: int = option(
        3, "score that many samples this many times, on consecutive seeds, and report the mean", minimum=1
    )


def cmd_train(config: TrainConfig) -> None:
    from inkwash.training.loop import train

    result = train(config)
    skipped = f"; {result.skipped_steps} non-finite step(s) skipped" if result.skipped_steps else ""
    print(
        f"trained to step {result.steps} in {result.seconds:.0f}s ({result.images_per_sec:.0f} images/s); "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}{skipped}; checkpoint in {result.run_dir}"
    )
    if result.interrupted:
        print(
            f"inkwash train: stopped by {result.interrupted} at step {result.steps}; continue with --resume latest",
            file=sys.stderr,
        )
        raise SystemExit(130 if result.interrupted == "SIGINT" else 143)


def cmd_sample(options: SampleOptions) -> None:
    from inkwash.commands.sample import sample_run

    summary = sample_run(options)
    print(
        f"wrote {summary['num_images']} images to {options.out} with {summary['sampler']} "
        f"({summary['steps']} steps, {summary['nfe']} model evaluations per image)"
    )


def cmd_noise(options: NoiseOptions) -> None:
    import torch
    from PIL import Image

    from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
    from inkwash.data.loading import load_digits, prepare_image, to_unit_range
    from inkwash.pictures import noising_strip, save_png

    if options.image:
        path = Path(options.image)
        if not path.is_file():
            raise InkwashError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                image.load()
                array = prepare_image(image, 3, options.image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InkwashError(f"cannot read image {path}: {exc}") from None
        images = to_unit_range(array[None])
    else:
        data = load_digits(16)
        images = torch.stack([data.images[(data.labels == d).nonzero()[0, 0]] for d in range(4)])
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule=options.beta_schedule))
    strip = noising_strip(schedule, images, list(options.t), torch.Generator().manual_seed(options.seed))
    save_png(strip, _output_file(options.out))
    print(f"wrote {options.out}")


def _output_file(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise InkwashError(f"--out must be a file name, got a directory: {out}")
    if out.suffix.lower() != ".png":
        raise InkwashError(f"--out must end in .png, got {out}")
    return out


def cmd_samplers(_: None) -> None:
    from inkwash.sampling.samplers import SAMPLERS

    print(f"{'id':20s} {'name':14s} {'order':>5s} {'stochastic':>10s} {'NFE/step':>8s} {'schedule':>11s}  note")
    for info in SAMPLERS.values():
        stochastic = "yes" if info.stochastic else "no"
        columns = (
            f"{info.id:20s} {info.display_name:14s} {info.order:5d} {stochastic:>10s} {info.nfe_per_step:8d} "
            f"{info.default_schedule:>11s}"
        )
        print(f"{columns}  {info.note}".rstrip())


def cmd_bench(options: BenchOptions) -> None:
    from inkwash.evaluation.oracle import load_gmm
    from inkwash.evaluation.sampler_bench import bench_samplers, format_table, parse_samplers, plot, write_json

    gmm = load_gmm(options.gmm)
    samplers = parse_samplers(options.samplers)
    if options.save_samples:
        Path(options.save_samples).mkdir(parents=True, exist_ok=True)
    rows = bench_samplers(
        gmm,
        samplers,
        list(options.steps),
        schedule=options.schedule,
        beta_schedule=options.beta_schedule,
        num_samples=options.num_samples,
        seed=options.seed,
        save_samples=options.save_samples,
    )
    print(
        f"{options.gmm}: {gmm.num_components} components in {gmm.dim} dimensions, {options.num_samples} samples, "
        f"{options.schedule or 'each sampler default'} schedule"
    )
    print(format_table(rows))
    plot(rows, _output_file(options.plot), f"{options.gmm}, {options.schedule or 'default'} schedule")
    print(f"wrote {options.plot}")
    if options.json:
        write_json(rows, options.json, asdict(options))


def cmd_eval(options: EvalOptions) -> None:
    from inkwash.evaluation.report import format_table, run_eval

    print(format_table(run_eval(options)))
    if options.json:
        print(f"wrote {options.json}")


def cmd_demo(options: DemoOptions) -> None:
    from inkwash.commands.demo import run_demo

    run_demo(**asdict(options))


def cmd_serve(options: ServeOptions) -> None:
    from inkwash.commands.serve import run_server

    run_server(options)


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    examples: tuple[str, ...]
    run: Callable[[Any], None] | None = None
    options: type | None = None  # the dataclass of its options
    config_file: bool = False  # --config FILE reads the options from a file; flags override it
    commands: dict[str, Command] = field(default_factory=dict)  # subcommands, e.g. inkwash bench samplers


COMMANDS = {
    "train": Command(
        "train a model",
        "Train an epsilon-prediction UNet (Ho et al. 2020) on images.",
        (
            "inkwash train --data digits --out runs/digits --steps 3000",
            "inkwash train --config runs/digits/checkpoints/step_00003000/config.json --out runs/again",
        ),
        cmd_train,
        TrainConfig,
        config_file=True,
    ),
    "sample": Command(
        "sample images from a trained run or a diffusers folder",
        "Sample images from a run directory written by 'inkwash train', or a diffusers pipeline folder (DDPM, "
        "DDIM, Stable Diffusion). Writes one PNG per image, grid.png, samples.npz (uint8 N x H x W x C under "
        "'samples') and reverse.png.",
        (
            "inkwash sample --checkpoint runs/digits --out samples --sampler ddim --steps 50 --num-images 64",
            "inkwash sample --checkpoint runs/digits_cond --out threes --class 3 --guidance-scale 3",
            "inkwash sample --checkpoint stable-diffusion-v1-5 --out cats --prompt 'a cat' --width 640 --height 384",
        ),
        cmd_sample,
        SampleOptions,
    ),
    "noise": Command(
        "draw the forward-noising strip",
        "Noise real images to several steps t in one closed-form computation each.",
        ("inkwash noise --data digits --out noising.png --t 0,100,200,500,1000",),
        cmd_noise,
        NoiseOptions,
    ),
    "samplers": Command(
        "list the samplers",
        "List every sampler with its WebUI name, order, whether it is stochastic and its NFE per step.",
        ("inkwash samplers",),
        cmd_samplers,
    ),
    "bench": Command(
        "benchmarks (bench samplers)",
        "Benchmarks.",
        ("inkwash bench samplers --gmm gmm64",),
        commands={
            "samplers": Command(
                "every sampler against the exact denoiser of a Gaussian mixture",
                "Run samplers on the exact denoiser of a Gaussian mixture and report NFE, the sliced Wasserstein "
                "distance to exact samples, the exact-vs-exact floor and the mode-weight error.",
                (
                    "inkwash bench samplers --gmm gmm64 --samplers euler,dpmpp_2m,unipc --steps 5,10,20 "
                    "--json bench.json",
                ),
                cmd_bench,
                BenchOptions,
            )
        },
    ),
    "eval": Command(
        "score samples against a reference (FID, KID, precision/recall, SWD, NLL)",
        "Score samples (an .npz or folder, or drawn from a run directory) against the test half of a reference, "
        "each score beside its real-data floor (the reference's train half scored the same way). Metrics: fid, "
        "kid, pr (precision and recall), swd (Laplacian-pyramid sliced Wasserstein), nll (bits/dim, needs "
        "--checkpoint).",
        (
            "inkwash eval --samples samples/samples.npz --reference digits --json eval.json",
            "inkwash eval --checkpoint runs/digits --reference digits --metrics fid,kid,nll --num-samples 2000",
        ),
        cmd_eval,
        EvalOptions,
    ),
    "serve": Command(
        "a web page and the Stable Diffusion WebUI's HTTP API for trained models",
        "Serve a page to sample from models in a browser (live preview, img2img and inpainting, PNG info) and "
        "the WebUI's /sdapi/v1 API (txt2img, img2img, progress, interrupt, png-info, ...) for the scripts and "
        "plug-ins written against it. Binds 127.0.0.1 unless --listen or --host says otherwise.",
        (
            "inkwash serve --checkpoint demo_out/run",
            "inkwash serve --models runs --port 7861 --api-auth alice:secret",
        ),
        cmd_serve,
        ServeOptions,
    ),
    "export": Command(
        "write a trained run as a diffusers DDPMPipeline folder",
        "Write a run's checkpoint as a diffusers DDPMPipeline folder (model_index.json, unet/ in safetensors, "
        "scheduler/) that DDPMPipeline.from_pretrained samples from and inkwash.load reads back. A network or "
        "schedule that diffusers cannot hold exactly is refused, naming the reason.",
        ("inkwash export --checkpoint runs/digits --diffusers digits_ddpm",),
        cmd_export,
        ExportOptions,
    ),
    "demo": Command(
        "train on digits, sample, and write every picture",
        "Train the digits preset within a time budget, sample it, write the pictures, and score the samples' "
        "FID beside the real-data floor.",
        ("inkwash demo --out demo_out --minutes 5", "inkwash demo --minutes 2 --eval-samples 0"),
        cmd_demo,
        DemoOptions,
    ),
}

CONFIG_HELP = (
    "read the options from a TOML, YAML or JSON file (a run's config.json too): keys are the option names "
    "(batch_size or batch-size); flags given here override the file; resume and overwrite come from the "
    "command line only"
)


def _epilog(examples: Sequence[str]) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in examples)


def _add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command], dest: str, metavar: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser, required=True)
    for name, command in commands.items():
        child = sub.add_parser(
            name,
            help=command.help,
            description=command.description,
            epilog=_epilog(command.examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.commands:
            _add_commands(child, command.commands, f"{name}_command", "BENCHMARK")
            continue
        child.set_defaults(run_command=command, command_parser=child)
        if command.config_file:
            child.add_argument("--config", dest="config_file", metavar="FILE", help=CONFIG_HELP)
        if command.options is not None:
            add_arguments(child, command.options, required=not command.config_file)


def build_parser() -> Parser:
    parser = Parser(
        prog="inkwash",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(("inkwash demo --out demo_out --minutes 5",)),
    )
    _add_commands(parser, COMMANDS, "command", "COMMAND")
    return parser


def make_options(command: Command, args: argparse.Namespace) -> Any:
    """The command's options: its dataclass's defaults, then the --config file, then the flags given."""
    cls, parser = command.options, args.command_parser
    if cls is None:
        return None
    values: dict[str, Any] = {}
    if command.config_file and args.config_file is not None:
        try:
            values, ignored = read_config_file(cls, args.config_file, RUN_CONFIG_SECTION)
        except InkwashError as exc:
            parser.error(str(exc))
        for spec in specs(cls):
            if spec.name in ignored and ignored[spec.name] != spec.default:
                print(
                    f"note: {args.config_file}: ignoring {spec.name} = {ignored[spec.name]!r}; "
                    f"only the command line sets {spec.flag}",
                    file=sys.stderr,
                )
    values.update(given_options(cls, args))
    missing = missing_options(cls, values)
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return cls(**values)


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and the reason, e.g. "cannot write out/x.png: No space left on device"."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.errno == errno.EEXIST and Path(exc.filename).is_file():
        reason = "a file is in the way of a folder"
    verb = "cannot write" if exc.errno in WRITE_ERRNOS else "cannot use"
    return f"{verb} {exc.filename}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.run_command
    options = make_options(command, args)
    try:
        if hasattr(options, "validate"):
            options.validate()
        command.run(options)
    except InkwashError as exc:
        close_bars()
        print(f"inkwash {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder that cannot be created or written: read-only, denied, full
        close_bars()
        print(f"inkwash {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"inkwash {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
