"""Training and sampling throughput of inkwash's UNet against a diffusers UNet2DModel.

Both networks have the same parameter count (within 10%), batch size and resolution. Each runs its
own library's standard path (inkwash's trainer step and DDIM sampler; diffusers' training-example
loop and DDIMScheduler) in the same process, interleaved round by round so that machine noise hits
both alike.
Prints images/s for each and the ratio inkwash / diffusers (> 1 means inkwash is faster).

    python benchmarks/throughput.py [--preset digits] [--batch-size 64] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from inkwash.denoiser import ModelDenoiser
from inkwash.samplers import sample_ddim
from inkwash.schedule import NoiseSchedule
from inkwash.steps import build_sigmas
from inkwash.train import diffusion_loss, make_optimizer
from inkwash.unet import UNet, count_parameters, preset


def diffusers_twin(config):
    """A diffusers UNet2DModel laid out like inkwash's: same widths, blocks and attention levels."""
    from diffusers import UNet2DModel

    widths = tuple(config.base_channels * m for m in config.channel_mult)
    down, up = [], []
    res = config.image_size
    for _ in widths:
        down.append("AttnDownBlock2D" if res in config.attention_resolutions else "DownBlock2D")
        res //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=config.head_channels,
        norm_num_groups=min(32, config.base_channels),
        dropout=config.dropout,
    )


def inkwash_train_step(model, batch_size, shape, schedule):
    """One step of inkwash's own trainer: diffusion_loss, its optimizer, gradient clipping."""
    optimizer = make_optimizer(model, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch_size, *shape, generator=generator) * 2 - 1

    def step():
        loss = diffusion_loss(model, schedule, x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def diffusers_train_step(model, batch_size, shape):
    """The loop of diffusers' train_unconditional example: DDPMScheduler.add_noise, AdamW, clipping."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch_size, *shape, generator=generator) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def inkwash_sampler(model, schedule, batch_size, shape, steps):
    denoiser = ModelDenoiser(model.eval(), schedule)
    sigmas = build_sigmas(schedule, steps, "leading")

    def run():
        x = torch.randn(batch_size, *shape) * (1 + sigmas[0].item() ** 2) ** 0.5
        sample_ddim(denoiser, x, sigmas)

    return run


def diffusers_sampler(model, batch_size, shape, steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    model.eval()

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        x = torch.randn(batch_size, *shape)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample

    return run


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sampling run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = preset(args.preset)
    ours = UNet(config)
    theirs = diffusers_twin(config)
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    if abs(n_ours / n_theirs - 1) > 0.10:
        raise SystemExit(f"parameter counts differ by more than 10%: {n_ours} vs {n_theirs}")
    schedule = NoiseSchedule()
    shape = (config.in_channels, config.image_size, config.image_size)
    b = args.batch_size

    train_ours = inkwash_train_step(ours, b, shape, schedule)
    train_theirs = diffusers_train_step(theirs, b, shape)
    sample_ours = inkwash_sampler(ours, schedule, b, shape, args.sample_steps)
    sample_theirs = diffusers_sampler(theirs, b, shape, args.sample_steps)

    for fn in (train_ours, train_theirs):  # warm-up
        fn()
    ours.train()
    theirs.train()
    times = {"train_ours": [], "train_theirs": [], "sample_ours": [], "sample_theirs": []}
    for _ in range(args.rounds):
        ours.train()
        theirs.train()
        times["train_ours"].append(timed(train_ours, args.train_steps))
        times["train_theirs"].append(timed(train_theirs, args.train_steps))
        times["sample_ours"].append(timed(sample_ours, 1))
        times["sample_theirs"].append(timed(sample_theirs, 1))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "preset": args.preset,
        "batch_size": b,
        "threads": torch.get_num_threads(),
        "parameters": {"inkwash": n_ours, "diffusers": n_theirs},
        "train_images_per_sec": {"inkwash": b / median["train_ours"], "diffusers": b / median["train_theirs"]},
        "sample_images_per_sec": {
            "inkwash": b / median["sample_ours"],
            "diffusers": b / median["sample_theirs"],
        },
    }
    result["train_ratio"] = result["train_images_per_sec"]["inkwash"] / result["train_images_per_sec"]["diffusers"]
    result["sample_ratio"] = result["sample_images_per_sec"]["inkwash"] / result["sample_images_per_sec"]["diffusers"]
    print(
        f"preset {args.preset}, batch {b}, {torch.get_num_threads()} threads; "
        f"parameters inkwash {n_ours:,} / diffusers {n_theirs:,}"
    )
    print(f"{'':10s} {'inkwash':>12s} {'diffusers':>12s} {'ratio':>7s}")
    for kind in ("train", "sample"):
        rates = result[f"{kind}_images_per_sec"]
        unit = "img/s" if kind == "train" else f"img/s ({args.sample_steps}-step DDIM)"
        print(f"{kind:10s} {rates['inkwash']:12.1f} {rates['diffusers']:12.1f} {result[kind + '_ratio']:7.2f}  {unit}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
