"""Checkpoint write and load time, and size on disk, for the rgb32 preset (CIFAR-10 sized).

Times what ``inkwash train`` does at every ``--checkpoint-every``: ``inkwash.training.resume.write_training_checkpoint``
writes the model, the EMA, the AdamW state (populated by one real step) and the training state (built
as train.py's ``_capture_state`` builds it for one process, with CIFAR-10's 50,000-image data order) as
safetensors, and config.json, each file fsynced, into a temporary directory that is then renamed into
place. ``load_training_checkpoint`` reads it all back into the modules and the optimizer.

The baseline is what most trainers do: one ``torch.save`` of the same state dicts (model, EMA,
optimizer, the same RNG states and data order, the config) without fsync, loaded with
``torch.load(weights_only=True)`` and ``load_state_dict``. ``torch.save`` + fsync (the file and its
folder) is the same baseline made as durable as inkwash's writer. The variants are interleaved in
every repeat; medians are printed, with the ratio inkwash / baseline (> 1: inkwash is slower).
Loads read files just written, so they come from the page cache, as a resume soon after a save does.

    python benchmarks/checkpoint.py [--preset rgb32] [--repeats 5] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inkwash.core.schedule import NoiseSchedule
from inkwash.core.unet import PRESETS, UNet, count_parameters, preset
from inkwash.data.loading import ImageData
from inkwash.training.loop import EpochSampler, TrainConfig, diffusion_loss, make_optimizer, noise_seed, run_config
from inkwash.training.resume import ResumeState, load_training_checkpoint, write_training_checkpoint
from inkwash.training.run_folder import new_run_id

CIFAR10_TRAIN_IMAGES = 50_000


def trained_state(preset_name: str, batch_size: int):
    """A model, its EMA and an AdamW whose moments exist (one real step), with the training state
    and run config the trainer would save at step 1."""
    torch.manual_seed(0)
    unet_config = preset(preset_name)
    schedule = NoiseSchedule()
    model = UNet(unet_config)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, lr=1e-4)
    data_rng = torch.Generator().manual_seed(0)
    noise_rng = torch.Generator().manual_seed(noise_seed(0, 0))
    batches = EpochSampler(CIFAR10_TRAIN_IMAGES, batch_size, data_rng)
    batches.next()
    shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
    x0 = torch.rand(2, *shape, generator=noise_rng) * 2 - 1  # (2, C, H, W): only the step's state matters
    diffusion_loss(model, schedule, x0, noise_rng).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = ResumeState(  # train.py's _capture_state for a world of one on the CPU
        step=1,
        data_rng=data_rng.get_state(),
        order=batches.order.clone(),
        position=batches.position,
        noise_rng=[noise_rng.get_state()],
        torch_rng=[torch.get_rng_state()],
        counters={"nonfinite_total": 0, "nonfinite_streak": 0},
    )
    # A stand-in for CIFAR-10: run_config reads only the source, the image shape and the count.
    data = ImageData(
        images=torch.zeros(shape).expand(CIFAR10_TRAIN_IMAGES, *shape), labels=None, class_names=None, source="cifar10"
    )
    train_config = TrainConfig(data="cifar10", preset=preset_name, batch_size=batch_size)
    config = run_config(train_config, unet_config, schedule, data, state.step, new_run_id())
    return model, ema, optimizer, state, config


def torch_save_payload(model, ema, optimizer, state: ResumeState, config: dict) -> dict:
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": {
            "step": state.step,
            "data_rng": state.data_rng,
            "order": state.order,
            "position": state.position,
            "noise_rng": state.noise_rng,
            "torch_rng": state.torch_rng,
            "counters": state.counters,
        },
        "config": config,
    }


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(payload: dict, path: Path, durable: bool) -> None:
    torch.save(payload, path)
    if durable:
        fsync_path(path)
        fsync_path(path.parent)


def load_torch(path: Path, model, ema, optimizer) -> None:
    loaded = torch.load(path, weights_only=True)
    model.load_state_dict(loaded["model"])
    ema.load_state_dict(loaded["ema"])
    optimizer.load_state_dict(loaded["optimizer"])


def timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="rgb32", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=128, help="recorded in the config (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="write here (default: the system's temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    model, ema, optimizer, state, config = trained_state(args.preset, args.batch_size)
    payload = torch_save_payload(model, ema, optimizer, state, config)
    # Fresh modules to load into, as a resuming trainer has.
    load_model, load_ema = copy.deepcopy(model), copy.deepcopy(ema)
    load_optimizer = make_optimizer(load_model, lr=1e-4)

    times: dict[str, list[float]] = {k: [] for k in ("inkwash", "torch.save", "torch.save+fsync")}
    times.update({f"load {k}": [] for k in ("inkwash", "torch.load")})
    sizes: dict[str, int] = {}
    torch_size = 0
    with tempfile.TemporaryDirectory(prefix="inkwash-ckpt-", dir=args.dir) as scratch:
        root = Path(scratch)
        for repeat in range(args.repeats + 1):  # repeat 0 is a warm-up, not counted
            state.step = config["step"] = repeat + 1
            plain, durable = root / f"plain{repeat}.pt", root / f"durable{repeat}.pt"
            seconds, written = timed(
                write_training_checkpoint, root / f"run{repeat}", config, model, ema, optimizer, state
            )
            record = {
                "inkwash": seconds,
                "torch.save": timed(save_torch, payload, plain, False)[0],
                "torch.save+fsync": timed(save_torch, payload, durable, True)[0],
                "load inkwash": timed(load_training_checkpoint, written, load_model, load_ema, load_optimizer)[0],
                "load torch.load": timed(load_torch, plain, load_model, load_ema, load_optimizer)[0],
            }
            sizes = {entry.name: entry.stat().st_size for entry in sorted(written.iterdir())}
            torch_size = plain.stat().st_size
            if repeat > 0:
                for name, seconds in record.items():
                    times[name].append(seconds)
            shutil.rmtree(written.parent.parent)
            plain.unlink()
            durable.unlink()

    median = {name: statistics.median(values) for name, values in times.items()}
    total = sum(sizes.values())
    result = {
        "preset": args.preset,
        "parameters": count_parameters(model),
        "repeats": args.repeats,
        "seconds": median,
        "all_seconds": times,
        "bytes": {"inkwash": sizes, "inkwash_total": total, "torch.save": torch_size},
        "write_ratio_vs_torch_save": median["inkwash"] / median["torch.save"],
        "write_ratio_vs_torch_save_fsync": median["inkwash"] / median["torch.save+fsync"],
        "load_ratio_vs_torch_load": median["load inkwash"] / median["load torch.load"],
    }
    mb = 1e6
    print(f"preset {args.preset}: {result['parameters']:,} parameters; medians of {args.repeats} repeats, interleaved")
    print(f"{'':28s} {'seconds':>8s} {'MB/s':>7s} {'vs torch.save':>14s}")
    rows = [
        ("write inkwash (fsynced)", median["inkwash"], total, median["inkwash"] / median["torch.save"]),
        ("write torch.save", median["torch.save"], torch_size, 1.0),
        ("write torch.save + fsync", median["torch.save+fsync"], torch_size, None),
        ("load inkwash", median["load inkwash"], total, median["load inkwash"] / median["load torch.load"]),
        ("load torch.load", median["load torch.load"], torch_size, 1.0),
    ]
    for name, seconds, size, ratio in rows:
        shown = f"{ratio:14.2f}" if ratio is not None else f"{'':14s}"
        print(f"{name:28s} {seconds:8.3f} {size / mb / seconds:7.0f} {shown}")
    print(f"inkwash / (torch.save + fsync) write: {result['write_ratio_vs_torch_save_fsync']:.2f}")
    print(f"size on disk: inkwash {total / mb:.1f} MB in all; torch.save {torch_size / mb:.1f} MB")
    for name, size in sizes.items():
        print(f"  {name:24s} {size / mb:8.2f} MB ({size:,} bytes)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
