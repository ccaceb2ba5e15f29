"""The ``inkwash`` command line: a thin, validating layer over the library."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from inkwash.errors import InkwashError
from inkwash.progress import close_bars

# Errors that mean the disk or the folder refuses the write, not that a path is wrong.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

DESCRIPTION = "inkwash: train and sample image diffusion models (DDPM family)."


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _t_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError(f"t values must be integers in 0..1000, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v > 1000 for v in values):
        raise argparse.ArgumentTypeError(f"steps must be integers in 1..1000, got {text!r}")
    return values


def _metric_list(text: str) -> list[str]:
    from inkwash.evaluation.evaluate import METRICS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {text!r}; choose from {', '.join(METRICS)}")
    return names


def _sampler_name(text: str) -> str:
    from inkwash.sampling.samplers import get_sampler

    try:
        return get_sampler(text).id
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_inference_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help=f"{prefix}where the network runs; auto is the GPU when there is one (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help=f"{prefix}bf16 or fp16 autocast of the network (fast on GPUs and AMX CPUs); the sampler's "
        "arithmetic stays fp32 (default: %(default)s)",
    )


def build_parser() -> Parser:
    from inkwash.core.schedule import BETA_SCHEDULES
    from inkwash.core.sigmas import STEP_SCHEDULES
    from inkwash.core.unet import PRESETS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(
        prog="inkwash",
        description=DESCRIPTION,
        formatter_class=fmt,
        epilog="example:\n  inkwash demo --out demo_out --minutes 5",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train a model",
        formatter_class=fmt,
        description="Train an epsilon-prediction UNet (Ho et al. 2020) on images.",
        epilog="example:\n  inkwash train --data digits --out runs/digits --steps 3000",
    )
    train.add_argument(
        "--data",
        required=True,
        metavar="digits|mnist|fashion-mnist|cifar10|FOLDER",
        help="a dataset name, or a folder of images (searched recursively)",
    )
    train.add_argument(
        "--data-dir", default="data", help="where mnist, fashion-mnist and cifar10 files live (default: %(default)s)"
    )
    train.add_argument(
        "--download", action="store_true", help="download missing mnist/fashion-mnist/cifar10 files (checksummed)"
    )
    train.add_argument(
        "--class-cond", action="store_true", help="use class labels (a folder's first-level subfolders are classes)"
    )
    train.add_argument(
        "--resize-mode",
        default="crop",
        choices=["crop", "resize"],
        help="crop: resize the short side, then center-crop; resize: squash to a square (default: %(default)s)",
    )
    train.add_argument("--hflip", action="store_true", help="random horizontal flips of the training images")
    train.add_argument("--out", required=True, help="run directory for checkpoints, log and pictures")
    train.add_argument("--preset", default="digits", choices=list(PRESETS), help="UNet preset (default: %(default)s)")
    train.add_argument("--steps", type=_positive_int, default=3000, help="optimizer steps (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default: %(default)s)")
    train.add_argument(
        "--image-size", type=_positive_int, default=None, help="image side in pixels (default: the preset's)"
    )
    train.add_argument(
        "--dropout", type=_nonneg_float, default=None, help="residual-block dropout (default: the preset's, 0.1)"
    )
    train.add_argument("--seed", type=_nonneg_int, default=0, help="(default: %(default)s)")
    train.add_argument(
        "--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints (default: %(default)s)"
    )
    train.add_argument("--beta-schedule", default="linear", choices=list(BETA_SCHEDULES), help="(default: %(default)s)")
    train.add_argument(
        "--prediction",
        default="eps",
        choices=["eps", "x0", "v"],
        help="what the network predicts (default: %(default)s)",
    )
    train.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="rescale the betas so the last step is pure noise (Lin et al. 2023); use with --prediction v",
    )
    train.add_argument(
        "--warmup-steps", type=_nonneg_int, default=100, help="linear learning-rate warm-up (default: %(default)s)"
    )
    train.add_argument("--ema-decay", type=_nonneg_float, default=0.999, help="(default: %(default)s)")
    train.add_argument(
        "--lr-schedule", default="constant", choices=["constant", "cosine"], help="after warm-up (default: %(default)s)"
    )
    train.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW (default: %(default)s)")
    train.add_argument("--adam-beta1", type=_nonneg_float, default=0.9, help="AdamW (default: %(default)s)")
    train.add_argument(
        "--adam-beta2",
        type=_nonneg_float,
        default=0.999,
        help="AdamW; 0.99 adapts faster, which helped a short digits run (default: %(default)s)",
    )
    train.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default: %(default)s)"
    )
    train.add_argument(
        "--min-snr-gamma",
        type=_positive_float,
        default=None,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs) (default: off)",
    )
    train.add_argument(
        "--input-perturbation",
        type=_nonneg_float,
        default=0.0,
        metavar="GAMMA",
        help="DDPM-IP (Ning et al. 2023): noise the input with noise + GAMMA * extra noise, keep the target; "
        "0.1 is theirs (default: off)",
    )
    train.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="bf16 autocast, or fp16 autocast with loss scaling (for GPUs; slow on most CPUs) (default: %(default)s)",
    )
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    train.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    train.add_argument("--compile", action="store_true", help="torch.compile the network (slow to start)")
    train.add_argument(
        "--max-nonfinite",
        type=_positive_int,
        default=10,
        help="stop after this many non-finite steps in a row; each is skipped (default: %(default)s)",
    )
    train.add_argument(
        "--cond-drop",
        type=_unit_float,
        default=0.1,
        help="label dropout for classifier-free guidance, with --class-cond (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue exactly from OUT's newest checkpoint (or start if it has none), or from PATH",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that already holds a run: the old run is moved aside and deleted",
    )
    train.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic CUDA kernels, so that a resumed GPU run is bitwise exact; CPU training is "
        "deterministic either way (default: on)",
    )
    train.add_argument(
        "--keep-last", type=_positive_int, default=3, help="checkpoints kept in OUT/checkpoints (default: %(default)s)"
    )
    train.add_argument("--log-every", type=_positive_int, default=10, help="steps per log row (default: %(default)s)")
    train.add_argument(
        "--sample-every", type=_positive_int, default=None, help="write OUT/samples/step_N.png every N steps"
    )
    train.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs the extra)")
    train.add_argument(
        "--eval-every", type=_positive_int, default=None, help="score the EMA model every N steps into log.csv"
    )
    train.add_argument(
        "--eval-metrics", default="fid,kid", help="metrics for --eval-every (see inkwash eval) (default: %(default)s)"
    )
    train.add_argument(
        "--eval-samples", type=_positive_int, default=500, help="images per --eval-every (default: %(default)s)"
    )
    train.add_argument(
        "--eval-reference", default=None, help="digits, a folder or an .npz (default: --data when it is one)"
    )

    sample = sub.add_parser(
        "sample",
        help="sample images from a trained run",
        formatter_class=fmt,
        description="Sample images from a run directory written by 'inkwash train'. Writes one PNG per "
        "image, grid.png, samples.npz (uint8 N x H x W x C under 'samples') and reverse.png.",
        epilog="example:\n"
        "  inkwash sample --checkpoint runs/digits --out samples --sampler ddim --steps 50 --num-images 64\n"
        "  inkwash sample --checkpoint runs/digits_cond --out threes --class 3 --guidance-scale 3",
    )
    sample.add_argument("--checkpoint", required=True, help="run directory with config.json and weights")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument(
        "--sampler",
        type=_sampler_name,
        default="ddim",
        help="a sampler id or WebUI name, e.g. ddim, 'Euler a', dpmpp_2m; see 'inkwash samplers' "
        "(default: %(default)s)",
    )
    sample.add_argument(
        "--steps", type=_positive_int, default=None, help="sampler steps (default: 1000 for ddpm, 50 for the others)"
    )
    sample.add_argument(
        "--schedule",
        default=None,
        choices=list(STEP_SCHEDULES),
        help="step schedule (default: the sampler's own, listed by 'inkwash samplers')",
    )
    sample.add_argument(
        "--eta",
        type=_nonneg_float,
        default=None,
        help="noise scale of DDIM and the ancestral/SDE samplers; DDIM: 0 deterministic, 1 = DDPM posterior "
        "(default: the sampler's, 0 for DDIM and 1 for the others)",
    )
    sample.add_argument(
        "--variance", default=None, choices=["beta_tilde", "beta"], help="DDPM variance (default: beta_tilde)"
    )
    sample.add_argument(
        "--s-churn",
        type=_nonneg_float,
        default=None,
        help="Karras et al.'s churn for euler, heun and dpm_2 (default: 0)",
    )
    sample.add_argument(
        "--rho", type=_positive_float, default=7.0, help="rho of the karras schedule (default: %(default)s)"
    )
    sample.add_argument("--init-image", default=None, help="img2img: start from this image (or folder of images)")
    sample.add_argument(
        "--strength",
        type=_unit_float,
        default=0.75,
        help="img2img: how much of the schedule to run, 0 returns the input, 1 starts from pure noise "
        "(default: %(default)s)",
    )
    sample.add_argument(
        "--mask",
        default=None,
        help="inpainting: a mask image, white = regenerate, black = keep; one of another size than the init "
        "image is resized to it first, as the WebUI does",
    )
    sample.add_argument("--num-images", type=_positive_int, default=64, help="(default: %(default)s)")
    sample.add_argument("--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    sample.add_argument("--seed", type=_nonneg_int, default=0, help="image i uses seed S+i (default: %(default)s)")
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sample.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] at each step")
    sample.add_argument(
        "--class",
        dest="class_label",
        metavar="CLASS",
        default=None,
        help="class-conditional checkpoints: a class name from the checkpoint (e.g. 3 for digits), an index, "
        "or 'all' (image i gets class i mod the number of classes) (default: unconditional)",
    )
    sample.add_argument(
        "--guidance-scale",
        type=_nonneg_float,
        default=1.0,
        help="classifier-free guidance weight w: 0 unconditional, 1 conditional, > 1 stronger; any other w "
        "doubles the model evaluations (default: %(default)s)",
    )
    sample.add_argument(
        "--grid-by-class",
        action="store_true",
        help="sample every class: grid.png gets one labelled row of --per-class images per class "
        "(replaces --num-images)",
    )
    sample.add_argument(
        "--per-class",
        type=_positive_int,
        default=None,
        help="images per class with --grid-by-class (default: 8)",
    )
    _add_inference_arguments(sample)

    noise = sub.add_parser(
        "noise",
        help="draw the forward-noising strip",
        formatter_class=fmt,
        description="Noise real images to several steps t in one closed-form computation each.",
        epilog="example:\n  inkwash noise --data digits --out noising.png --t 0,100,200,500,1000",
    )
    source = noise.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file")
    source.add_argument("--data", choices=["digits"], help="use four digits")
    noise.add_argument("--out", required=True, help="output PNG")
    noise.add_argument(
        "--t",
        type=_t_list,
        default=list(range(0, 1001, 100)),
        help="comma-separated steps in 0..1000 (default: 0,100,...,1000)",
    )
    noise.add_argument("--image-size", type=_positive_int, default=64, help="side for --image (default: %(default)s)")
    noise.add_argument("--beta-schedule", default="linear", choices=list(BETA_SCHEDULES), help="(default: %(default)s)")
    noise.add_argument("--seed", type=_nonneg_int, default=0, help="(default: %(default)s)")

    sub.add_parser(
        "samplers",
        help="list the samplers",
        formatter_class=fmt,
        description="List every sampler with its WebUI name, order, whether it is stochastic and its NFE per step.",
        epilog="example:\n  inkwash samplers",
    )

    bench = sub.add_parser(
        "bench",
        help="benchmarks (bench samplers)",
        formatter_class=fmt,
        description="Benchmarks.",
        epilog="example:\n  inkwash bench samplers --gmm gmm64",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", parser_class=Parser)
    bench_sub.required = True
    bench_samplers = bench_sub.add_parser(
        "samplers",
        help="every sampler against the exact denoiser of a Gaussian mixture",
        formatter_class=fmt,
        description="Run samplers on the exact denoiser of a Gaussian mixture and report NFE, the sliced "
        "Wasserstein distance to exact samples, the exact-vs-exact floor and the mode-weight error.",
        epilog="example:\n  inkwash bench samplers --gmm gmm64 --samplers euler,dpmpp_2m,unipc --steps 5,10,20 "
        "--json bench.json",
    )
    bench_samplers.add_argument(
        "--gmm",
        required=True,
        help="a preset (gmm2d; gmm64, on which the default schedules were chosen; gmm48, held out from that "
        "choice) or an .npz with weights, means, stds",
    )
    bench_samplers.add_argument("--samplers", default="all", help="'all' or comma-separated ids (default: all)")
    bench_samplers.add_argument("--steps", type=_int_list, default=[5, 10, 20, 50], help="(default: 5,10,20,50)")
    bench_samplers.add_argument(
        "--schedule",
        default=None,
        choices=list(STEP_SCHEDULES),
        help="step schedule for every sampler (default: each sampler's own)",
    )
    bench_samplers.add_argument(
        "--beta-schedule", default="linear", choices=list(BETA_SCHEDULES), help="sigma range (default: %(default)s)"
    )
    bench_samplers.add_argument("--num-samples", type=_positive_int, default=10_000, help="(default: %(default)s)")
    bench_samplers.add_argument("--seed", type=_nonneg_int, default=0, help="(default: %(default)s)")
    bench_samplers.add_argument("--json", default=None, help="write the results as JSON")
    bench_samplers.add_argument("--save-samples", default=None, help="write DIR/<sampler>_<steps>.npy")
    bench_samplers.add_argument(
        "--plot", default="bench_samplers.png", help="PNG of error against NFE (default: %(default)s)"
    )

    evaluate = sub.add_parser(
        "eval",
        help="score samples against a reference (FID, KID, precision/recall, SWD, NLL)",
        formatter_class=fmt,
        description="Score samples (an .npz or folder, or drawn from a run directory) against the test half of a "
        "reference, each score beside its real-data floor (the reference's train half scored the same way). "
        "Metrics: fid, kid, pr (precision and recall), swd (Laplacian-pyramid sliced Wasserstein), nll "
        "(bits/dim, needs --checkpoint).",
        epilog="example:\n  inkwash eval --samples samples/samples.npz --reference digits --json eval.json\n"
        "  inkwash eval --checkpoint runs/digits --reference digits --metrics fid,kid,nll --num-samples 2000",
    )
    images = evaluate.add_mutually_exclusive_group(required=True)
    images.add_argument("--samples", help="an .npz of uint8 images (as 'inkwash sample' writes) or a folder")
    images.add_argument("--checkpoint", help="a run directory to sample (with the sampling options below)")
    evaluate.add_argument("--reference", required=True, help="'digits', a folder of images or an .npz of images")
    evaluate.add_argument(
        "--metrics",
        type=_metric_list,
        default=["fid", "kid", "pr", "swd"],
        help="comma-separated, from fid,kid,pr,swd,nll (default: fid,kid,pr,swd)",
    )
    evaluate.add_argument(
        "--features",
        choices=["digits", "random", "inception"],
        default=None,
        help="feature network for fid/kid/pr (default: digits for the digits reference, random otherwise)",
    )
    evaluate.add_argument(
        "--inception-weights",
        default=None,
        help="safetensors weights of --features inception, converted from pytorch-fid's .pth "
        "(default: $INKWASH_INCEPTION_WEIGHTS, else pt_inception-2015-12-05.safetensors in the cache directory)",
    )
    evaluate.add_argument(
        "--num-samples", type=_positive_int, default=None, help="(default: all of --samples; 1000 from --checkpoint)"
    )
    evaluate.add_argument("--json", default=None, help="also write the report as JSON")
    evaluate.add_argument("--sampler", type=_sampler_name, default="ddim", help="(default: %(default)s)")
    evaluate.add_argument("--steps", type=_positive_int, default=None, help="(default: 1000 for ddpm, else 50)")
    evaluate.add_argument("--schedule", default=None, choices=list(STEP_SCHEDULES), help="(default: the sampler's own)")
    evaluate.add_argument("--eta", type=_nonneg_float, default=None, help="(default: the sampler's)")
    evaluate.add_argument("--seed", type=_nonneg_int, default=0, help="(default: %(default)s)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=250, help="(default: %(default)s)")
    evaluate.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    evaluate.add_argument(
        "--nll-terms",
        type=_positive_int,
        default=100,
        help="KL terms of the bound per image, stratified; 999 or more sums all of them (default: %(default)s)",
    )
    evaluate.add_argument(
        "--guidance-scale",
        type=_nonneg_float,
        default=1.0,
        help="classifier-free guidance for a class-conditional --checkpoint, whose labels follow its "
        "training class frequencies (default: %(default)s, plain conditional sampling)",
    )
    _add_inference_arguments(evaluate, "--checkpoint: ")

    demo = sub.add_parser(
        "demo",
        help="train on digits, sample, and write every picture",
        formatter_class=fmt,
        description="Train the digits preset within a time budget, sample it, write the pictures, and score "
        "the samples' FID beside the real-data floor.",
        epilog="example:\n  inkwash demo --out demo_out --minutes 5\n  inkwash demo --minutes 2 --eval-samples 0",
    )
    demo.add_argument("--out", default="demo_out", help="output directory (default: %(default)s)")
    demo.add_argument(
        "--minutes", type=_positive_float, default=5.0, help="training time budget (default: %(default)s)"
    )
    demo.add_argument("--seed", type=_nonneg_int, default=0, help="(default: %(default)s)")
    demo.add_argument(
        "--eval-samples",
        type=_nonneg_int,
        default=1000,
        help="score this many samples of the demo's DDPM sampler (FID, KID, precision/recall) beside the "
        "real-data floor; 0 skips it (default: %(default)s)",
    )
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from inkwash.training.loop import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        dropout=args.dropout,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        beta_schedule=args.beta_schedule,
        prediction=args.prediction,
        zero_terminal_snr=args.zero_terminal_snr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        class_cond=args.class_cond,
        data_dir=args.data_dir,
        resize_mode=args.resize_mode,
        hflip=args.hflip,
        download=args.download,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        grad_accum=args.grad_accum,
        min_snr_gamma=args.min_snr_gamma,
        input_perturbation=args.input_perturbation,
        precision=args.precision,
        device=args.device,
        channels_last=args.channels_last,
        compile=args.compile,
        max_nonfinite=args.max_nonfinite,
        cond_drop=args.cond_drop,
        resume=args.resume,
        overwrite=args.overwrite,
        deterministic=args.deterministic,
        keep_last=args.keep_last,
        log_every=args.log_every,
        sample_every=args.sample_every,
        tensorboard=args.tensorboard,
        eval_every=args.eval_every,
        eval_metrics=args.eval_metrics,
        eval_samples=args.eval_samples,
        eval_reference=args.eval_reference,
    )
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


def cmd_sample(args: argparse.Namespace) -> None:
    from inkwash.commands.sample import SampleOptions, sample_run

    options = SampleOptions(
        checkpoint=args.checkpoint,
        out=args.out,
        sampler=args.sampler,
        steps=args.steps,
        schedule=args.schedule,
        eta=args.eta,
        variance=args.variance,
        s_churn=args.s_churn,
        rho=args.rho,
        init_image=args.init_image,
        strength=args.strength,
        mask=args.mask,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        use_ema=not args.no_ema,
        clip_denoised=not args.no_clip,
        class_label=args.class_label,
        guidance_scale=args.guidance_scale,
        grid_by_class=args.grid_by_class,
        per_class=args.per_class,
        device=args.device,
        precision=args.precision,
    )
    summary = sample_run(options)
    print(
        f"wrote {summary['num_images']} images to {args.out} with {summary['sampler']} "
        f"({summary['steps']} steps, {summary['nfe']} model evaluations per image)"
    )


def cmd_noise(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
    from inkwash.data.loading import load_digits, prepare_image, to_unit_range
    from inkwash.pictures import noising_strip, save_png

    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise InkwashError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                image.load()
                array = prepare_image(image, 3, args.image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InkwashError(f"cannot read image {path}: {exc}") from None
        images = to_unit_range(array[None])
    else:
        data = load_digits(16)
        images = torch.stack([data.images[(data.labels == d).nonzero()[0, 0]] for d in range(4)])
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule=args.beta_schedule))
    strip = noising_strip(schedule, images, args.t, torch.Generator().manual_seed(args.seed))
    save_png(strip, _output_file(args.out))
    print(f"wrote {args.out}")


def _output_file(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise InkwashError(f"--out must be a file name, got a directory: {out}")
    if out.suffix.lower() != ".png":
        raise InkwashError(f"--out must end in .png, got {out}")
    return out


def cmd_samplers(args: argparse.Namespace) -> None:
    from inkwash.sampling.samplers import SAMPLERS

    print(f"{'id':20s} {'name':14s} {'order':>5s} {'stochastic':>10s} {'NFE/step':>8s} {'schedule':>11s}  note")
    for info in SAMPLERS.values():
        stochastic = "yes" if info.stochastic else "no"
        columns = (
            f"{info.id:20s} {info.display_name:14s} {info.order:5d} {stochastic:>10s} {info.nfe_per_step:8d} "
            f"{info.default_schedule:>11s}"
        )
        print(f"{columns}  {info.note}".rstrip())


def cmd_bench(args: argparse.Namespace) -> None:
    from inkwash.evaluation.oracle import load_gmm
    from inkwash.evaluation.sampler_bench import bench_samplers, format_table, parse_samplers, plot, write_json

    gmm = load_gmm(args.gmm)
    samplers = parse_samplers(args.samplers)
    if args.save_samples:
        Path(args.save_samples).mkdir(parents=True, exist_ok=True)
    rows = bench_samplers(
        gmm,
        samplers,
        args.steps,
        schedule=args.schedule,
        beta_schedule=args.beta_schedule,
        num_samples=args.num_samples,
        seed=args.seed,
        save_samples=args.save_samples,
    )
    print(
        f"{args.gmm}: {gmm.num_components} components in {gmm.dim} dimensions, {args.num_samples} samples, "
        f"{args.schedule or 'each sampler default'} schedule"
    )
    print(format_table(rows))
    plot(rows, _output_file(args.plot), f"{args.gmm}, {args.schedule or 'default'} schedule")
    print(f"wrote {args.plot}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("command", "bench_command")}
        write_json(rows, args.json, settings)


def cmd_eval(args: argparse.Namespace) -> None:
    from inkwash.evaluation.evaluate import EvalOptions, format_table, run_eval

    options = EvalOptions(
        reference=args.reference,
        samples=args.samples,
        checkpoint=args.checkpoint,
        num_samples=args.num_samples,
        metrics=tuple(args.metrics),
        features=args.features,
        inception_weights=args.inception_weights,
        sampler=args.sampler,
        steps=args.steps,
        schedule=args.schedule,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
        use_ema=not args.no_ema,
        nll_terms=args.nll_terms,
        guidance_scale=args.guidance_scale,
        device=args.device,
        precision=args.precision,
        json=args.json,
    )
    print(format_table(run_eval(options)))
    if args.json:
        print(f"wrote {args.json}")


def cmd_demo(args: argparse.Namespace) -> None:
    from inkwash.commands.demo import run_demo

    run_demo(args.out, minutes=args.minutes, seed=args.seed, eval_samples=args.eval_samples)


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and the reason, e.g. "cannot write out/x.png: No space left on device"."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.errno == errno.EEXIST and Path(exc.filename).is_file():
        reason = "a file is in the way of a folder"
    verb = "cannot write" if exc.errno in WRITE_ERRNOS else "cannot use"
    return f"{verb} {exc.filename}: {reason}"


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "noise": cmd_noise,
    "samplers": cmd_samplers,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "eval": cmd_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
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
