"""Training and sampling throughput of inkwash's UNet: against a diffusers UNet2DModel, and in bf16.

Both networks have the same layout, batch size and resolution, and parameter counts within 2% (the
script refuses to run otherwise): diffusers' UNet2DModel gets inkwash's block widths and, with
``resnet_time_scale_shift="scale_shift"``, inkwash's scale-shift time conditioning (Dhariwal & Nichol
2021), so the two hold the same weights in the same layers rather than making up for a different
time projection with wider convolutions. Both train with the same optimizer, inkwash's
``make_optimizer`` (AdamW, fused where the build has it); the script checks that the class and the
fused / foreach settings agree. Each runs its own library's standard path (inkwash's trainer step and
DDIM sampler; diffusers' training-example loop and DDIMScheduler) in the same process, interleaved
round by round so that machine noise hits both alike. Prints both parameter counts and their ratio,
the optimizer, images/s for each and the ratio inkwash / diffusers (> 1 means inkwash is faster).

The same rounds time inkwash in bf16 mixed precision the way ``inkwash train --precision bf16`` runs:
the loss under ``torch.autocast(device, dtype=torch.bfloat16)`` with fp32 weights, optimizer and
gradient clipping (``precision.precision_context``); for sampling, each denoiser call (the network
forward) under the same autocast. ``--compile`` adds both precisions with the network under
``torch.compile``. Prints images/s for each variant and its ratio to fp32 (> 1 means faster than fp32).
``--precision-only`` skips diffusers.

    python benchmarks/throughput.py [--preset digits] [--batch-size 64] [--rounds 5] [--json out.json]
    python benchmarks/throughput.py --precision-only --rounds 3
    python benchmarks/throughput.py --device cuda --compile --preset rgb32 --batch-size 128

Runs single-threaded by default (``--threads``): on a busy machine torch's intra-op threads stall (on
this project's 2-core machine, 2 threads trained the tiny preset 70x slower than 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.precision import native_bf16_cpu, precision_context, resolve_precision
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.core.unet import PRESETS, UNet, count_parameters, preset
from inkwash.sampling.samplers import sample_ddim
from inkwash.training.loop import diffusion_loss, make_optimizer

CPU = torch.device("cpu")
PARAMETER_TOLERANCE = 0.02  # the largest relative difference in parameter count the comparison accepts


def diffusers_twin(config, num_class_embeds: int | None = None, *, resnet_time_scale_shift: str = "default"):
    """A diffusers UNet2DModel laid out like inkwash's: same widths, blocks and attention levels, and
    with ``num_class_embeds`` a class embedding added to the time embedding, as inkwash's.

    ``resnet_time_scale_shift="scale_shift"`` also gives its residual blocks inkwash's scale-shift time
    conditioning (a time projection to 2 * channels); diffusers' default adds a projection to channels,
    which leaves the twin about 7% smaller than inkwash's UNet."""
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
        num_class_embeds=num_class_embeds,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )


def parameter_mismatch(n_ours: int, n_theirs: int) -> str | None:
    """Why the two networks are not of comparable size, or None when their counts are within PARAMETER_TOLERANCE."""
    if abs(n_ours / n_theirs - 1) <= PARAMETER_TOLERANCE:
        return None
    return (
        f"parameter counts differ by more than {PARAMETER_TOLERANCE:.0%}: inkwash {n_ours:,}, diffusers {n_theirs:,} "
        f"(ratio {n_ours / n_theirs:.4f}); adjust diffusers_twin's block widths for this preset"
    )


def optimizer_settings(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class and its fused / foreach settings, which decide which update kernel runs."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    return f"{type(optimizer).__name__} (fused={fused}, foreach={foreach})"


def inkwash_train_step(model, optimizer, batch_size, shape, schedule, precision="fp32", device=CPU):
    """One step of inkwash's own trainer: diffusion_loss under its precision context, the optimizer,
    gradient clipping (train.py's ``_accumulate`` and step, without the EMA and the logging)."""
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, *shape, generator=generator, device=device) * 2 - 1  # (B, C, H, W)

    def step():
        model.train()
        with precision_context(precision, device):
            loss = diffusion_loss(model, schedule, x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def diffusers_train_step(model, optimizer, batch_size, shape, device=CPU):
    """The loop of diffusers' train_unconditional example: DDPMScheduler.add_noise, the optimizer (the
    example's AdamW, here built as inkwash's so that both run the same update kernel), clipping."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, *shape, generator=generator, device=device) * 2 - 1

    def step():
        model.train()
        t = torch.randint(0, 1000, (batch_size,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def inkwash_sampler(model, schedule, batch_size, shape, steps, precision="fp32", device=CPU):
    """DDIM with every denoiser call (the network forward) under the precision context."""
    denoiser = ModelDenoiser(model, schedule)
    sigmas = build_sigmas(schedule, steps, "leading")

    def mixed_precision_denoiser(x, sigma, cond=None):
        with precision_context(precision, device):
            return denoiser(x, sigma, cond)

    def run():
        model.eval()
        x = torch.randn(batch_size, *shape, device=device) * (1 + sigmas[0].item() ** 2) ** 0.5
        sample_ddim(mixed_precision_denoiser, x, sigmas)

    return run


def diffusers_sampler(model, batch_size, shape, steps, device=CPU):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)

    @torch.no_grad()
    def run():
        model.eval()
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn(batch_size, *shape, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample

    return run


def timed(fn: Callable[[], None], repeats: int, device: torch.device = CPU) -> float:
    """Seconds per call; on a GPU, waits for the queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def machine_label(device: torch.device) -> str:
    """The CPU model and its bf16 instructions (or the GPU's name): figures differ between machines."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}; native bf16 (AVX-512 BF16 or AMX): {'yes' if native_bf16_cpu() else 'no'}"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call, in MiB above what was held before it: ``max_memory_allocated`` on a GPU;
    on Linux the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def precision_variants(compile_too: bool) -> list[tuple[str, str, bool]]:
    """(name, precision, compiled) for each inkwash variant; the first is the fp32 baseline."""
    variants = [("fp32", "fp32", False), ("bf16", "bf16", False)]
    if compile_too:
        variants += [("fp32 compiled", "fp32", True), ("bf16 compiled", "bf16", True)]
    return variants


MEMORY_TASKS = ("inkwash_train", "inkwash_sample", "diffusers_train", "diffusers_sample")


def memory_probe(args, task: str, size: int) -> float | None:
    """Run one task once in this (fresh) process and return its peak memory in MiB (``peak_memory_mib``)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = preset(args.preset)
    shape = (config.in_channels, config.image_size, config.image_size)
    schedule = NoiseSchedule()
    precision = resolve_precision("auto", device)
    if task.startswith("inkwash"):
        model = UNet(config).to(device)
        if task == "inkwash_train":
            fn = inkwash_train_step(model, make_optimizer(model, lr=1e-4), size, shape, schedule, precision, device)
        else:
            fn = inkwash_sampler(model, schedule, size, shape, args.sample_steps, precision, device)
    else:
        model = diffusers_twin(config, resnet_time_scale_shift="scale_shift").to(device)
        if task == "diffusers_train":
            fn = diffusers_train_step(model, make_optimizer(model, lr=1e-4), size, shape, device)
        else:
            fn = diffusers_sampler(model, size, shape, args.sample_steps, device)
    return peak_memory_mib(fn, device)


def measure_memory(args, sizes: list[int]) -> dict:
    """Peak memory (MiB above what the process held before the call) of one training step and one sampling
    run at each batch size: inkwash at its default precision, diffusers in fp32. Each runs in a process of
    its own, so that no allocator holds memory from another task."""
    import subprocess
    import sys

    unit = "max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM)"
    print(f"peak memory, MiB above the baseline ({unit}); one training step / one {args.sample_steps}-step DDIM run")
    tasks = MEMORY_TASKS[:2] if args.precision_only else MEMORY_TASKS
    table: dict = {}
    for size in sizes:
        row = {}
        for task in tasks:
            command = [sys.executable, __file__, "--memory-probe", f"{task}:{size}", "--preset", args.preset,
                       "--device", args.device, "--sample-steps", str(args.sample_steps),
                       "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = done.stdout.strip().splitlines()
            row[task] = float(lines[-1]) if done.returncode == 0 and lines and lines[-1] != "None" else None
        table[str(size)] = row
        shown = ", ".join(f"{key} {value:.0f}" for key, value in row.items() if value is not None)
        print(f"  batch {size}: {shown}")
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sampling run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision-only", action="store_true", help="only inkwash fp32 against bf16; no diffusers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="also time the network under torch.compile")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--memory-batch-sizes",
        default="64,256",
        help="batch sizes at which to report peak memory of one training step and one sampling run ('' skips)",
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # TASK:SIZE, run by measure_memory
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if min(args.batch_size, args.train_steps, args.sample_steps, args.rounds) < 1:
        parser.error("--batch-size, --train-steps, --sample-steps and --rounds must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU")
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        parser.error("--device cuda: this GPU has no bf16 support")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        task, size = args.memory_probe.split(":")
        print(memory_probe(args, task, int(size)))
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = preset(args.preset)
    ours = UNet(config)
    n_ours = count_parameters(ours)
    schedule = NoiseSchedule()
    shape = (config.in_channels, config.image_size, config.image_size)
    b = args.batch_size

    # Every task gets its own copy of the same initial weights (and its own optimizer), so no variant
    # trains or samples another's network. Tasks run in this order within every round.
    tasks: dict[tuple[str, str], tuple[Callable[[], None], int]] = {}
    optimizers = {}
    for name, precision, compiled in precision_variants(args.compile):
        train_model, sample_model = (copy.deepcopy(ours).to(device) for _ in range(2))
        optimizers[name] = make_optimizer(train_model, lr=1e-4)  # before compiling: the same parameters
        if compiled:  # sampling as `inkwash sample --compile` runs it: a channels_last copy on a CPU
            if device.type == "cpu":
                sample_model = sample_model.to(memory_format=torch.channels_last)
            train_model, sample_model = torch.compile(train_model), torch.compile(sample_model)
        tasks["train", name] = (
            inkwash_train_step(train_model, optimizers[name], b, shape, schedule, precision, device),
            args.train_steps,
        )
        tasks["sample", name] = (
            inkwash_sampler(sample_model, schedule, b, shape, args.sample_steps, precision, device),
            1,
        )
    n_theirs = None
    if not args.precision_only:
        theirs = diffusers_twin(config, resnet_time_scale_shift="scale_shift")
        n_theirs = count_parameters(theirs)
        mismatch = parameter_mismatch(n_ours, n_theirs)
        if mismatch is not None:
            raise SystemExit(f"throughput.py: preset {args.preset}: {mismatch}")
        sample_theirs = copy.deepcopy(theirs).to(device)
        theirs = theirs.to(device)
        optimizers["diffusers"] = make_optimizer(theirs, lr=1e-4)
        ours_settings, theirs_settings = (optimizer_settings(optimizers[k]) for k in ("fp32", "diffusers"))
        if ours_settings != theirs_settings:
            raise SystemExit(
                f"throughput.py: the optimizers differ: inkwash {ours_settings}, diffusers {theirs_settings}"
            )
        tasks["train", "diffusers"] = (
            diffusers_train_step(theirs, optimizers["diffusers"], b, shape, device),
            args.train_steps,
        )
        tasks["sample", "diffusers"] = (diffusers_sampler(sample_theirs, b, shape, args.sample_steps, device), 1)

    for fn, _ in tasks.values():  # warm-up (and compilation)
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in tasks}
    for _ in range(args.rounds):
        for key, (fn, repeats) in tasks.items():
            times[key].append(timed(fn, repeats, device))
    rate = {key: b / statistics.median(values) for key, values in times.items()}

    threads = torch.get_num_threads()
    result: dict = {
        "preset": args.preset,
        "batch_size": b,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "rounds": args.rounds,
        "sample_steps": args.sample_steps,
        "optimizer": optimizer_settings(optimizers["fp32"]),
    }
    where = result["device"] if device.type == "cuda" else f"cpu, {threads} threads"
    print(f"preset {args.preset}, batch {b}, {where}, {args.rounds} interleaved rounds (medians)")
    if n_theirs is not None:
        result["parameters"] = {"inkwash": n_ours, "diffusers": n_theirs, "ratio": n_ours / n_theirs}
        result["train_images_per_sec"] = {"inkwash": rate["train", "fp32"], "diffusers": rate["train", "diffusers"]}
        result["sample_images_per_sec"] = {"inkwash": rate["sample", "fp32"], "diffusers": rate["sample", "diffusers"]}
        for kind in ("train", "sample"):
            rates = result[f"{kind}_images_per_sec"]
            result[f"{kind}_ratio"] = rates["inkwash"] / rates["diffusers"]
        print(f"parameters inkwash {n_ours:,} / diffusers {n_theirs:,} = {n_ours / n_theirs:.4f}; both fp32")
        print(f"optimizer (both): {result['optimizer']}, lr 1e-4")
        print(f"{'':10s} {'inkwash':>12s} {'diffusers':>12s} {'ratio':>7s}")
        for kind in ("train", "sample"):
            rates = result[f"{kind}_images_per_sec"]
            unit = "img/s" if kind == "train" else f"img/s ({args.sample_steps}-step DDIM)"
            print(
                f"{kind:10s} {rates['inkwash']:12.1f} {rates['diffusers']:12.1f} {result[kind + '_ratio']:7.2f}  {unit}"
            )
        print()

    result["precision"] = {}
    print(f"inkwash ({n_ours:,} parameters); img/s, and the ratio to fp32 (> 1 is faster)")
    print(f"{'':14s} {'train':>9s} {'vs fp32':>8s} {'sample':>9s} {'vs fp32':>8s}")
    for name, _, _ in precision_variants(args.compile):
        entry = {
            "train_images_per_sec": rate["train", name],
            "sample_images_per_sec": rate["sample", name],
            "train_vs_fp32": rate["train", name] / rate["train", "fp32"],
            "sample_vs_fp32": rate["sample", name] / rate["sample", "fp32"],
        }
        result["precision"][name] = entry
        print(
            f"{name:14s} {entry['train_images_per_sec']:9.1f} {entry['train_vs_fp32']:8.2f} "
            f"{entry['sample_images_per_sec']:9.1f} {entry['sample_vs_fp32']:8.2f}"
        )
    print(f"(sample: {args.sample_steps}-step DDIM; train: {args.train_steps} steps per round)")

    # inkwash as a user gets it on this machine: --precision auto (bf16 where the CPU has bf16 instructions).
    default = resolve_precision("auto", device)
    result["machine"] = machine_label(device)
    result["default_precision"] = default
    print(f"\nmachine: {result['machine']}; inkwash's default precision here: {default}")
    if n_theirs is not None:
        result["defaults_vs_diffusers"] = {}
        for name in [default] + ([f"{default} compiled"] if args.compile else []):
            ratios = {kind: rate[kind, name] / rate[kind, "diffusers"] for kind in ("train", "sample")}
            result["defaults_vs_diffusers"][name] = ratios
            print(f"inkwash {name} / diffusers fp32: train {ratios['train']:.2f}x, sample {ratios['sample']:.2f}x")

    memory_sizes = [int(size) for size in args.memory_batch_sizes.split(",") if size.strip()]
    if memory_sizes:
        result["peak_memory_mib"] = measure_memory(args, memory_sizes)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
