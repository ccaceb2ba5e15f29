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

A preset with a patch size (the digits preset runs on 2x2 pixel blocks) is timed against a twin of the
same widths, levels and attention at full resolution, since UNet2DModel has no space-to-depth input: the
same parameters, more FLOPs per image. The FLOP counts printed show how much of a ratio that explains.

The same rounds time inkwash in bf16 mixed precision the way ``inkwash train --precision bf16`` runs:
the loss under ``torch.autocast(device, dtype=torch.bfloat16)`` with fp32 weights, optimizer and
gradient clipping (``precision.precision_context``); for sampling, each denoiser call (the network
forward) under the same autocast. ``--compile`` adds both precisions with the network under
``torch.compile``. Prints images/s for each variant and its ratio to fp32 (> 1 means faster than fp32).
``--precision-only`` skips diffusers. ``--compile-mode`` picks torch.compile's mode (``reduce-overhead``
replays CUDA graphs) and ``--compile-precisions`` the precisions compiled. ``--memory-formats
contiguous,channels_last`` adds a channels_last (NHWC) twin of every variant but the fp32 baseline, and
``--cudnn-benchmark`` runs inkwash's tasks with cuDNN's benchmark mode on.

Each variant's achieved TFLOP/s comes from the model FLOPs per image that
``torch.utils.flop_counter.FlopCounterMode`` counts (one training step: forward and backward; sampling: one
forward per step), and with ``--peak-tflops`` (the chip's measured bf16 matmul peak) its fraction of that peak
("MFU"). A task that fails is left out and reported in ``task_errors``; SIGTERM writes what was measured.

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
import os
import statistics
import sys
import time
import traceback
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
    res = config.grid_size  # attention on the same levels as inkwash's (its sizes count grid positions)
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


def inkwash_train_step(
    model, optimizer, batch_size, shape, schedule, precision="fp32", device=CPU, compiled=False, channels_last=False
):
    """One step of inkwash's own trainer: diffusion_loss under its precision context, the optimizer,
    gradient clipping (train.py's ``_accumulate`` and step, without the EMA and the logging).

    ``compiled``: the model is under torch.compile, whose "reduce-overhead" mode replays CUDA graphs (cudagraph
    trees); each step then starts with ``torch.compiler.cudagraph_mark_step_begin()``, which tells it that the
    previous step's outputs (its loss, its gradients, already consumed) may be overwritten. Elsewhere it is a
    no-op. ``channels_last``: the images are laid out as the trainer's ``--channels-last`` lays them out."""
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, *shape, generator=generator, device=device) * 2 - 1  # (B, C, H, W)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step():
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
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


def inkwash_sampler(model, schedule, batch_size, shape, steps, precision="fp32", device=CPU, compiled=False):
    """DDIM with every denoiser call (the network forward) under the precision context. ``compiled``: each
    network call starts a new cudagraph-trees step (see ``inkwash_train_step``); the denoiser turns the network's
    output into a new tensor at once, so no step reads a replayed graph's output after the next replay."""
    denoiser = ModelDenoiser(model, schedule)
    sigmas = build_sigmas(schedule, steps, "leading")

    def mixed_precision_denoiser(x, sigma, cond=None):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
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


def with_cudnn_benchmark(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with cuDNN's benchmark mode on for the length of each call: the first call with each shape times the
    convolution algorithms and keeps the fastest (and, under CUDA graphs, the one captured). Other tasks keep
    PyTorch's default (off). Without cuDNN (a CPU) the flag does nothing."""

    def run() -> None:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            fn()
        finally:
            torch.backends.cudnn.benchmark = before

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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


MEMORY_FORMATS = ("contiguous", "channels_last")


def precision_variants(
    compile_too: bool,
    compiled_precisions: tuple[str, ...] = ("fp32", "bf16"),
    memory_formats: tuple[str, ...] = ("contiguous",),
) -> list[tuple[str, str, bool, bool]]:
    """(name, precision, compiled, channels_last) for each inkwash variant; the first is the fp32 baseline.

    Each memory format after the first adds a twin of every variant but the baseline, its name ending in
    ", channels_last": the networks and the training images in that layout (NHWC), which cuDNN's tensor-core
    convolutions read without a transpose."""
    base = [("fp32", "fp32", False), ("bf16", "bf16", False)]
    if compile_too:
        base += [(f"{p} compiled", p, True) for p in ("fp32", "bf16") if p in compiled_precisions]
    variants = [(name, p, compiled, memory_formats[0] == "channels_last") for name, p, compiled in base]
    for fmt in memory_formats[1:]:
        variants += [(f"{name}, {fmt}", p, compiled, fmt == "channels_last") for name, p, compiled in base[1:]]
    return variants


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile`` in the given mode: "default", "reduce-overhead" (CUDA graphs; on a CPU, inductor
    alone), "max-autotune-no-cudagraphs" or "max-autotune"."""
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


def model_flops(model: torch.nn.Module, shape: tuple[int, ...], batch: int = 2, inkwash_model: bool = True) -> dict:
    """FLOPs per image of one forward and of one training step (forward and backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention: the work a GPU's tensor
    cores do; elementwise work and the optimizer are not counted) on a copy of the model on the meta device
    (shapes only, no arithmetic), at a small batch. Attention runs through SDPA's math backend there, so that
    diffusers' fused attention is counted as inkwash's matmuls are. The training step is the network's part of
    diffusion_loss: the forward on noised images at random timesteps, an MSE loss, the backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    model = copy.deepcopy(model).to(meta)
    x = torch.randn(batch, *shape, device=meta)
    t = torch.linspace(1, 999, batch, device=meta)

    def forward():
        return model(x, t) if inkwash_model else model(x, t).sample

    model.eval()
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    forward_flops = counter.get_total_flops()
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.mse_loss(forward(), torch.zeros_like(x)).backward()
    train_flops = counter.get_total_flops()
    return {
        "forward_per_image": forward_flops / batch,
        "train_step_per_image": train_flops / batch,
        "counted_at_batch": batch,
    }


def flops_rates(rate_train: float | None, rate_sample: float | None, flops: dict, sample_steps: int,
                peak_tflops: float | None) -> dict:  # fmt: skip
    """Achieved TFLOP/s of training and sampling (images/s times the counted FLOPs per image; sampling makes one
    forward per step), and their fraction of ``peak_tflops`` (model FLOPs utilization, "MFU")."""
    out: dict = {}
    for kind, rate, per_image in (
        ("train", rate_train, flops["train_step_per_image"]),
        ("sample", rate_sample, flops["forward_per_image"] * sample_steps),
    ):
        if rate is None:
            continue
        out[f"{kind}_tflops"] = rate * per_image / 1e12
        if peak_tflops:
            out[f"{kind}_mfu"] = out[f"{kind}_tflops"] / peak_tflops
    return out


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
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode for --compile; reduce-overhead replays CUDA graphs (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-precisions",
        default="fp32,bf16",
        help="the precisions that get a compiled variant with --compile (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-formats",
        default="contiguous",
        help="comma-separated: contiguous and/or channels_last; each after the first adds a twin of every inkwash "
        "variant but the fp32 baseline in that layout (default: %(default)s)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="run inkwash's tasks with torch.backends.cudnn.benchmark on (diffusers' keep the default, off)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the chip's peak (e.g. its measured bf16 matmul TFLOP/s): reports each variant's fraction of it (MFU)",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip counting the model's FLOPs")
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
    args.compile_precisions = tuple(p.strip() for p in args.compile_precisions.split(",") if p.strip())
    if not set(args.compile_precisions) <= {"fp32", "bf16"} or not args.compile_precisions:
        parser.error("--compile-precisions takes fp32 and/or bf16, separated by a comma")
    args.memory_formats = tuple(dict.fromkeys(f.strip() for f in args.memory_formats.split(",") if f.strip()))
    if not args.memory_formats or not set(args.memory_formats) <= set(MEMORY_FORMATS):
        parser.error(f"--memory-formats takes {' and/or '.join(MEMORY_FORMATS)}, separated by a comma")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU")
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        parser.error("--device cuda: this GPU has no bf16 support")
    return args


class Interrupted(Exception):
    """SIGTERM (a time limit): stop timing, report and write what was measured."""


STOPPED: dict[str, int] = {}  # the signal that stopped the run, once one has


def _on_term(signum, frame):
    STOPPED["signal"] = signum
    raise Interrupted(f"signal {signum}")


def _stopped(error: BaseException) -> bool:
    """Whether ``error`` is the SIGTERM, raised where it arrived or wrapped by torch.compile on its way out."""
    return isinstance(error, Interrupted) or "signal" in STOPPED


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        task, size = args.memory_probe.split(":")
        print(memory_probe(args, task, int(size)))
        return
    import signal

    signal.signal(signal.SIGTERM, _on_term)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = preset(args.preset)
    ours = UNet(config)
    n_ours = count_parameters(ours)
    schedule = NoiseSchedule()
    shape = (config.in_channels, config.image_size, config.image_size)
    b = args.batch_size
    variants = precision_variants(args.compile, args.compile_precisions, args.memory_formats)
    compiled_names = {name for name, _, compiled, _ in variants if compiled}
    threads = torch.get_num_threads()
    result: dict = {
        "preset": args.preset,
        "batch_size": b,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "rounds": args.rounds,
        "train_steps": args.train_steps,
        "sample_steps": args.sample_steps,
        "compile_mode": args.compile_mode if args.compile else None,
        "memory_formats": list(args.memory_formats),
        "cudnn_benchmark": args.cudnn_benchmark,
        "peak_tflops": args.peak_tflops,
        "complete": False,
    }

    try:
        if not args.no_flops:  # counted before anything is timed: cheap, and reported even when cut short
            try:
                flops = {"inkwash": model_flops(ours, shape)}
            except Exception as error:  # a measurement of its own: never stops the timing
                flops = {}
                result["flops_error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"throughput.py: counting FLOPs failed: {result['flops_error']}", flush=True)
            if flops:
                result["flops"] = flops
                print(
                    f"FLOPs per image (FlopCounterMode): inkwash forward "
                    f"{flops['inkwash']['forward_per_image'] / 1e9:.3f} G, "
                    f"training step {flops['inkwash']['train_step_per_image'] / 1e9:.3f} G",
                    flush=True,
                )
            write_json(result, args.json)

        # Every task gets its own copy of the same initial weights (and its own optimizer), so no variant
        # trains or samples another's network. Tasks run in this order within every round.
        tasks: dict[tuple[str, str], tuple[Callable[[], None], int]] = {}
        optimizers = {}
        for name, precision, compiled, channels_last in variants:
            train_model, sample_model = (copy.deepcopy(ours).to(device) for _ in range(2))
            if channels_last:
                nhwc = torch.channels_last
                train_model, sample_model = (m.to(memory_format=nhwc) for m in (train_model, sample_model))
            optimizers[name] = make_optimizer(train_model, lr=1e-4)  # before compiling: the same parameters
            if compiled:  # sampling as `inkwash sample --compile` runs it: a channels_last copy on a CPU
                if device.type == "cpu":
                    sample_model = sample_model.to(memory_format=torch.channels_last)
                train_model = compile_model(train_model, args.compile_mode)
                sample_model = compile_model(sample_model, args.compile_mode)
            train_step = inkwash_train_step(
                train_model, optimizers[name], b, shape, schedule, precision, device, compiled, channels_last
            )
            sampler = inkwash_sampler(sample_model, schedule, b, shape, args.sample_steps, precision, device, compiled)
            if args.cudnn_benchmark:
                train_step, sampler = with_cudnn_benchmark(train_step), with_cudnn_benchmark(sampler)
            tasks["train", name] = (train_step, args.train_steps)
            tasks["sample", name] = (sampler, 1)
        n_theirs = None
        if not args.precision_only:
            theirs = diffusers_twin(config, resnet_time_scale_shift="scale_shift")
            n_theirs = count_parameters(theirs)
            mismatch = parameter_mismatch(n_ours, n_theirs)
            if mismatch is not None:
                raise SystemExit(f"throughput.py: preset {args.preset}: {mismatch}")
            if "flops" in result:
                try:
                    result["flops"]["diffusers"] = model_flops(theirs, shape, inkwash_model=False)
                except Exception as error:
                    result["flops_error"] = f"diffusers: {type(error).__name__}: {error}"[:300]
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
        result["optimizer"] = optimizer_settings(optimizers["fp32"])
        if n_theirs is not None:
            result["parameters"] = {"inkwash": n_ours, "diffusers": n_theirs, "ratio": n_ours / n_theirs}

        times: dict[tuple[str, str], list[float]] = {key: [] for key in tasks}
        warmup: dict[str, float] = {}
        result["warmup_seconds"] = warmup  # the first calls of each task, compilation included
        failures: dict[str, str] = {}  # a task that fails (say, under torch.compile) is dropped; the rest go on
        result["task_errors"] = failures

        def attempt(key, run) -> None:
            try:
                run()
            except Exception as error:
                if _stopped(error):
                    raise Interrupted(f"signal {STOPPED.get('signal', 15)}") from error
                failures[" ".join(key)] = f"{type(error).__name__}: {error}"[:500]
                traceback.print_exc()
                print(f"throughput.py: {' '.join(key)} failed and is left out: {failures[' '.join(key)]}", flush=True)
                del tasks[key]

        def warm_up(key) -> None:  # a round's worth of calls, and at least 3 under torch.compile, whose CUDA
            # graphs run eagerly once, are recorded on the second call and replayed from the third on
            fn, repeats = tasks[key]
            calls = max(repeats, 3) if key[1] in compiled_names else repeats
            attempt(key, lambda: warmup.__setitem__(" ".join(key), round(timed(fn, calls, device) * calls, 3)))

        def time_round(keys) -> None:
            for key in [key for key in keys if key in tasks]:
                fn, repeats = tasks[key]
                attempt(key, lambda: times[key].append(timed(fn, repeats, device)))  # noqa: B023

        try:
            eager = [key for key in tasks if key[1] not in compiled_names]
            compiled_keys = [key for key in tasks if key not in eager]
            for key in eager:
                warm_up(key)
            if compiled_keys:  # one round of the eager tasks before compiling: figures even if compilation
                time_round(eager)  # runs past the time limit (their medians then take rounds + 1 rounds)
                result["eager_rounds_before_compiling"] = 1
                for name in dict.fromkeys(key[1] for key in compiled_keys):  # likewise, each compiled variant
                    keys = [key for key in compiled_keys if key[1] == name]  # gets a round as soon as it is
                    for key in keys:  # compiled, so that a limit hit while compiling the next one leaves its
                        warm_up(key)  # figures
                    time_round(keys)
                result["compiled_rounds_after_warmup"] = 1
            for _ in range(args.rounds):
                time_round(list(tasks))
        except Interrupted as stop:
            result["interrupted"] = f"{stop} during the timing; the medians are of the rounds that finished"
            print(f"throughput.py: {result['interrupted']}", flush=True)
        report(args, result, times, variants, n_ours, n_theirs)
        if "interrupted" not in result:
            memory_sizes = [int(size) for size in args.memory_batch_sizes.split(",") if size.strip()]
            if memory_sizes:
                result["peak_memory_mib"] = measure_memory(args, memory_sizes)
            result["complete"] = not failures
    except Exception as error:
        if not _stopped(error):
            raise
        result["interrupted"] = f"signal {STOPPED.get('signal', 15)}"
        print(f"throughput.py: interrupted ({result['interrupted']}); writing what was measured", flush=True)
    finally:
        write_json(result, args.json)
    if "interrupted" in result:  # at once: torch.compile's worker threads and processes may never join
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(124)
    if result.get("task_errors"):
        raise SystemExit(1)


def report(args, result: dict, times: dict, variants, n_ours: int, n_theirs: int | None) -> None:
    """Medians, images/s, the ratios, FLOP/s and MFU from the rounds timed (all of them, or those that
    finished before a time limit), printed and put in ``result``."""
    b = args.batch_size
    rate = {key: b / statistics.median(values) for key, values in times.items() if values}
    device = torch.device(args.device)
    threads = result["threads"]
    where = result["device"] if device.type == "cuda" else f"cpu, {threads} threads"
    print(f"preset {args.preset}, batch {b}, {where}, {args.rounds} interleaved rounds (medians)")
    diffusers_timed = n_theirs is not None and ("train", "diffusers") in rate and ("train", "fp32") in rate
    if diffusers_timed:
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

    flops = result.get("flops", {})
    peak = args.peak_tflops
    result["precision"] = {}
    mode = f", compile mode {args.compile_mode}" if args.compile else ""
    print(f"inkwash ({n_ours:,} parameters{mode}); img/s, and the ratio to fp32 (> 1 is faster)")
    flop_head = f" {'train TF/s':>10s} {'sample TF/s':>11s}" + (
        f" {'train MFU':>9s} {'sample MFU':>10s}" if peak else ""
    )
    w = max([14] + [len(name) for name, *_ in variants])  # the name column
    print(f"{'':{w}s} {'train':>9s} {'vs fp32':>8s} {'sample':>9s} {'vs fp32':>8s}" + (flop_head if flops else ""))
    base_train, base_sample = rate.get(("train", "fp32")), rate.get(("sample", "fp32"))
    for name, *_ in variants:
        train, sample = rate.get(("train", name)), rate.get(("sample", name))
        if train is None and sample is None:
            continue
        entry = {"train_images_per_sec": train, "sample_images_per_sec": sample}
        entry["train_vs_fp32"] = train / base_train if train and base_train else None
        entry["sample_vs_fp32"] = sample / base_sample if sample and base_sample else None
        if "inkwash" in flops:
            entry.update(flops_rates(train, sample, flops["inkwash"], args.sample_steps, peak))
        result["precision"][name] = entry
        cells = _flop_cells(entry, peak) if flops else ""
        print(f"{name:{w}s} {_f(train, 9, 1)} {_f(entry['train_vs_fp32'], 8, 2)} "
              f"{_f(sample, 9, 1)} {_f(entry['sample_vs_fp32'], 8, 2)}{cells}")  # fmt: skip
    if "diffusers" in flops and (("train", "diffusers") in rate or ("sample", "diffusers") in rate):
        entry = flops_rates(rate.get(("train", "diffusers")), rate.get(("sample", "diffusers")), flops["diffusers"],
                            args.sample_steps, peak)  # fmt: skip
        result["diffusers_flops_rates"] = entry
        print(f"{'diffusers fp32':{w}s} {_f(rate.get(('train', 'diffusers')), 9, 1)} {'':8s} "
              f"{_f(rate.get(('sample', 'diffusers')), 9, 1)} {'':8s}" + _flop_cells(entry, peak))  # fmt: skip
    print(f"(sample: {args.sample_steps}-step DDIM; train: {args.train_steps} steps per round)")
    if flops:
        peak_text = f"; MFU: the fraction of {peak:.4g} TFLOP/s" if peak else ""
        print(f"(TF/s: the FLOPs FlopCounterMode counts per image times images/s{peak_text})")

    # inkwash as a user gets it on this machine: --precision auto (bf16 where the CPU has bf16 instructions).
    default = resolve_precision("auto", device)
    result["machine"] = machine_label(device)
    result["default_precision"] = default
    print(f"\nmachine: {result['machine']}; inkwash's default precision here: {default}")
    if n_theirs is not None:
        result["defaults_vs_diffusers"] = {}
        candidates = [default] + [name for name, _, compiled, channels_last in variants if compiled or channels_last]
        for name in dict.fromkeys(candidates):
            if all((kind, name) in rate and (kind, "diffusers") in rate for kind in ("train", "sample")):
                ratios = {kind: rate[kind, name] / rate[kind, "diffusers"] for kind in ("train", "sample")}
                result["defaults_vs_diffusers"][name] = ratios
                print(f"inkwash {name} / diffusers fp32: train {ratios['train']:.2f}x, sample {ratios['sample']:.2f}x")


def _f(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def _flop_cells(entry: dict, peak: float | None) -> str:
    cells = f" {_f(entry.get('train_tflops'), 10, 3)} {_f(entry.get('sample_tflops'), 11, 3)}"
    if peak:
        cells += f" {_f(entry.get('train_mfu'), 9, 3)} {_f(entry.get('sample_mfu'), 10, 3)}"
    return cells


if __name__ == "__main__":
    main()
