"""Stable Diffusion speed and memory: inkwash against diffusers' ``StableDiffusionPipeline`` on the same folder.

Both run the same sampler (DPM++ 2M: diffusers' ``DPMSolverMultistepScheduler`` built from the folder's
scheduler config; inkwash's ``dpmpp_2m``), the same number of steps, classifier-free guidance scale 7.5, the
same prompt and negative prompt, the same batch size and precision, each from prompt to decoded uint8 images.
The folder is a random-weight pipeline built here (``inkwash.interop.random_folders.build_stable_diffusion``):
``--size tiny`` (64x64 images) or ``--size sd15`` (Stable Diffusion 1.5's shapes at 512x512, about 1.07 billion
parameters, no download); ``--folder`` reuses an existing one instead.

For each batch size: seconds per image and images/s (the median of ``--rounds`` rounds after one warm-up,
inkwash and diffusers interleaved round by round, so that machine noise hits both alike), and peak memory
including the loaded weights: on a GPU ``torch.cuda.max_memory_allocated`` (the activation peak above what the
process held, plus the library's own weights measured when it was loaded); on a CPU the peak resident set
(VmHWM above the RSS after the imports) of a fresh process per library and batch size. The ratios: speed
inkwash / diffusers (> 1 means inkwash is faster), memory inkwash / diffusers (< 1 means inkwash uses less).

    python benchmarks/sd_speed.py --size tiny --device cpu --steps 2 --rounds 1 --batch-sizes 1,2
    python benchmarks/sd_speed.py --size sd15 --device cuda --precision fp16 --json sd.json

A failure on one side (a library that will not load or generate) is recorded in the JSON as that side's error,
and the other side is still measured. The JSON is rewritten after each batch size and when the process gets
SIGTERM, so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata

import torch

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, highly detailed"
NEGATIVE_PROMPT = "blurry, low quality, watermark"
GUIDANCE_SCALE = 7.5
SEED = 0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIXELS = {"tiny": 64, "sd15": 512}
INKWASH, INKWASH_COMPILED, DIFFUSERS = "inkwash", "inkwash compiled", "diffusers"


# --- the two libraries ------------------------------------------------------------------------------------


def load_inkwash(folder: str, device: str, precision: str):
    import inkwash

    return inkwash.load(folder, device=device, precision=precision)


def load_diffusers(folder: str, device: str, precision: str):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[precision], safety_checker=None)
    pipe = pipe.to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inkwash_run(pipe, args, batch: int, compiled: bool) -> Callable[[], None]:
    def run() -> None:
        images = pipe.generate(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            sampler="dpmpp_2m",
            steps=args.steps,
            guidance_scale=GUIDANCE_SCALE,
            num_images=batch,
            batch_size=batch,
            seed=SEED,
            precision=args.precision,
            show_progress=False,
            compile=compiled,
        )
        check_images(images, batch, args)

    return run


def diffusers_run(pipe, args, batch: int) -> Callable[[], None]:
    def run() -> None:
        generator = torch.Generator(device=args.device).manual_seed(SEED)
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE_SCALE,
            num_images_per_prompt=batch,
            output_type="np",
            generator=generator,
        ).images
        check_images(images, batch, args)

    return run


def check_images(images, batch: int, args) -> None:
    shape = tuple(getattr(images, "shape", ()))
    if shape != (batch, args.height, args.width, 3):
        raise RuntimeError(f"expected images of shape {(batch, args.height, args.width, 3)}, got {shape}")


def load(name: str, args):
    if name == DIFFUSERS:
        return load_diffusers(args.folder, args.device, args.precision)
    return load_inkwash(args.folder, args.device, args.precision)


def runner(name: str, pipe, args, batch: int) -> Callable[[], None]:
    if name == DIFFUSERS:
        return diffusers_run(pipe, args, batch)
    return inkwash_run(pipe, args, batch, compiled=name == INKWASH_COMPILED)


# --- measuring ----------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_probes(args, probes: list[tuple[str, int]]) -> list[tuple[float | None, str | None]]:
    """Run in a process that has imported both libraries and touched no pipeline: for each (library, batch
    size), a forked child (a fresh process: no allocator state from any other task) loads that library's
    pipeline and generates once; its peak resident set in MiB above its RSS before loading (VmHWM, reset
    through /proc/self/clear_refs), so the loaded weights count and the imports, common to both, do not.
    Returns (MiB or None, a problem or None) for each."""
    import diffusers  # noqa: F401  (both sides' imports, before any baseline)
    import transformers  # noqa: F401
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import inkwash
    import inkwash.interop.stable_diffusion  # noqa: F401

    found: list[tuple[float | None, str | None]] = []
    for name, batch in probes:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, exit without cleanup
            os.close(read_end)
            code = 0
            try:
                with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear:
                    clear.write("5")  # resets VmHWM to the current RSS
                before = _status_kib("VmRSS")
                pipe = load(name, args)
                runner(name, pipe, args, batch)()
                message = str((_status_kib("VmHWM") - before) / 1024)
            except BaseException as error:  # reported to the parent
                message, code = "error: " + error_text(error), 1
            os.write(write_end, message.encode())
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            message = reader.read().decode(errors="replace").strip()
        _, status = os.waitpid(pid, 0)
        try:
            found.append((float(message), None))
        except ValueError:
            found.append((None, message or f"the probe exited with status {status}"))
    return found


def cpu_memory(args, probes: list[tuple[str, int]]) -> list[tuple[float | None, str | None]]:
    """``memory_probes`` in a subprocess of its own (this process has run both pipelines already)."""
    spec = ",".join(f"{name}:{batch}" for name, batch in probes)
    command = [sys.executable, __file__, "--memory-probe", spec, "--folder", args.folder,
               "--size", args.size, "--device", "cpu", "--precision", args.precision, "--steps", str(args.steps),
               "--width", str(args.width), "--height", str(args.height), "--threads", str(args.threads)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=args.probe_timeout)
    except subprocess.TimeoutExpired:
        return [(None, f"the memory probes timed out after {args.probe_timeout} s")] * len(probes)
    lines = done.stdout.strip().splitlines()
    try:
        return [(mib, problem) for mib, problem in json.loads(lines[-1])]
    except (IndexError, ValueError, TypeError):
        problem = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][-300:]
        return [(None, problem)] * len(probes)


def machine_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    bf16 = sorted(flag for flag in flags if "bf16" in flag or flag.startswith("amx"))
    return f"{model}; {os.cpu_count()} CPUs; bf16 flags: {' '.join(bf16) or 'none'}"


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("diffusers", "transformers", "tokenizers", "huggingface_hub", "accelerate", "inkwash"):
        try:
            module = __import__(package)
            found[package] = getattr(module, "__version__", None) or metadata.version(package)
            found[f"{package}_file"] = getattr(module, "__file__", None)
        except Exception as error:  # reported, not fatal
            found[package] = f"not importable: {error!r}"[:200]
    return found


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def build_folder(args, result: dict) -> None:
    """Build the random-weight folder into a temporary directory (on the GPU when there is one: the random
    initialization of a billion parameters is the slow part on a CPU), recording where and how long."""
    from inkwash.interop.random_folders import build_stable_diffusion

    args.folder = tempfile.mkdtemp(prefix=f"sd_speed_{args.size}_")
    atexit.register(shutil.rmtree, args.folder, True)  # a built folder goes when the script ends (sd15: 2 GB)
    start = time.perf_counter()
    where = "cpu"
    if args.device == "cuda":
        try:
            with torch.device("cuda"):
                pipe = build_stable_diffusion(args.folder, args.size, SEED, DTYPES[args.precision])
            where = "cuda"
        except Exception as error:  # fall back to building on the CPU
            result["folder"]["cuda_build_error"] = error_text(error)
            print(f"building on the GPU failed ({error_text(error)}); building on the CPU", flush=True)
            pipe = build_stable_diffusion(args.folder, args.size, SEED, DTYPES[args.precision])
    else:
        pipe = build_stable_diffusion(args.folder, args.size, SEED, DTYPES[args.precision])
    del pipe
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the builder's copy of the weights is not either library's
    seconds = time.perf_counter() - start
    result["folder"].update(built=True, built_on=where, build_seconds=round(seconds, 2))
    print(f"built the {args.size} folder on the {where} in {seconds:.1f} s: {args.folder}", flush=True)


# --- the run --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=list(PIXELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--width", type=int, default=None, help="default: 64 for tiny, 512 for sd15")
    parser.add_argument("--height", type=int, default=None, help="default: 64 for tiny, 512 for sd15")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time inkwash with compile=True")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurements")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu, torch's default on cuda)"
    )
    parser.add_argument("--probe-timeout", type=int, default=300, help="seconds for the CPU memory probes")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    parser.add_argument("--folder", default=None, help="an existing pipeline folder to use instead of building one")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # NAME:BATCH,..., run by cpu_memory
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    args.width = args.width or PIXELS[args.size]
    args.height = args.height or PIXELS[args.size]
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error("--batch-sizes takes integers separated by commas, e.g. 1,4")
    if not args.batch_sizes or min([*args.batch_sizes, args.steps, args.rounds]) < 1:
        parser.error("--batch-sizes, --steps and --rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU")
    return args


def write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


def summarize(result: dict, key: str, names: list[str]) -> None:
    """Medians, images/s and the ratios for one batch size (from the rounds so far)."""
    entry = result["batches"][key]
    batch = int(key)
    for name in names:
        side = entry.get(name)
        if side and side.get("seconds_per_batch"):
            median = statistics.median(side["seconds_per_batch"])
            side["seconds_per_image"] = median / batch
            side["images_per_sec"] = batch / median
    ours, theirs = entry.get(INKWASH, {}), entry.get(DIFFUSERS, {})
    if ours.get("seconds_per_image") and theirs.get("seconds_per_image"):
        entry["speed_ratio"] = theirs["seconds_per_image"] / ours["seconds_per_image"]
    if ours.get("peak_memory_mib") and theirs.get("peak_memory_mib"):
        entry["memory_ratio"] = ours["peak_memory_mib"] / theirs["peak_memory_mib"]
    compiled = entry.get(INKWASH_COMPILED, {})
    if compiled.get("seconds_per_image") and theirs.get("seconds_per_image"):
        entry["compiled_speed_ratio"] = theirs["seconds_per_image"] / compiled["seconds_per_image"]


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def print_table(result: dict, names: list[str]) -> None:
    unit = "max_memory_allocated" if result["device"] == "cuda" else "peak RSS, fresh process"
    print(f"\n{result['size']} {result['width']}x{result['height']}, {result['precision']}, {result['steps']} "
          f"steps DPM++ 2M, guidance {GUIDANCE_SCALE}, {result['rounds']} interleaved rounds (medians); "
          f"memory: {unit}")  # fmt: skip
    print(f"{'batch':>5s} {'library':18s} {'s/image':>9s} {'images/s':>9s} {'peak MiB':>9s}")
    for key, entry in result["batches"].items():
        for name in names:
            side = entry.get(name, {})
            if "error" in side and not side.get("seconds_per_image"):
                print(f"{key:>5s} {name:18s} error: {side['error'][:80]}")
                continue
            spi, ips, mem = side.get("seconds_per_image"), side.get("images_per_sec"), side.get("peak_memory_mib")
            print(f"{key:>5s} {name:18s} {_cell(spi, 9, 4)} {_cell(ips, 9, 2)} {_cell(mem, 9, 0)}")
        ratios = []
        if "speed_ratio" in entry:
            ratios.append(f"speed inkwash/diffusers {entry['speed_ratio']:.2f}x (> 1: inkwash faster)")
        if "compiled_speed_ratio" in entry:
            ratios.append(f"compiled {entry['compiled_speed_ratio']:.2f}x")
        if "memory_ratio" in entry:
            ratios.append(f"memory inkwash/diffusers {entry['memory_ratio']:.2f}")
        if ratios:
            print(f"{'':>5s} {'; '.join(ratios)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probes = [(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) for spec in args.memory_probe.split(",")]
        print(json.dumps(memory_probes(args, probes)))
        return 0

    result: dict = {
        "script": "benchmarks/sd_speed.py",
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "sampler": "DPM++ 2M (inkwash dpmpp_2m; diffusers DPMSolverMultistepScheduler from the folder's config)",
        "steps": args.steps,
        "guidance_scale": GUIDANCE_SCALE,
        "width": args.width,
        "height": args.height,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_label(args.device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "folder": {"path": args.folder, "built": False},
        "libraries": {},
        "batches": {},
        "complete": False,
    }
    names = [INKWASH] + ([INKWASH_COMPILED] if args.compile else []) + [DIFFUSERS]

    def on_term(signum, frame):  # a time limit: keep what was measured, then leave at once (no thread joins)
        result["interrupted"] = f"signal {signum}"
        write(result, args.json)
        if result["folder"].get("built"):
            shutil.rmtree(args.folder, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    print(f"machine: {result['machine']}; torch {result['versions']['torch']}, diffusers "
          f"{result['versions']['diffusers']}, transformers {result['versions']['transformers']}; "
          f"{result['date_utc']}", flush=True)  # fmt: skip

    if args.folder is None:
        try:
            build_folder(args, result)
        except Exception as error:
            result["folder"]["error"] = error_text(error)
            traceback.print_exc()
            write(result, args.json)
            print(f"sd_speed.py: could not build the {args.size} folder: {error_text(error)}", file=sys.stderr)
            return 1
    result["folder"]["path"] = args.folder

    # Load each library once (the compiled variant shares inkwash's pipeline); on a GPU, its weights' memory.
    pipes: dict = {}
    for name in (INKWASH, DIFFUSERS):
        info: dict = {}
        result["libraries"][name] = info
        before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
        start = time.perf_counter()
        try:
            pipes[name] = load(name, args)
            synchronize(args.device)
            info["load_seconds"] = round(time.perf_counter() - start, 2)
            if args.device == "cuda":
                info["weights_mib"] = (torch.cuda.memory_allocated() - before) / 2**20
            print(f"loaded {name} in {info['load_seconds']} s", flush=True)
        except Exception as error:
            info["error"] = error_text(error)
            traceback.print_exc()
            print(f"{name}: could not load: {info['error']}", flush=True)
    if INKWASH_COMPILED in names:
        result["libraries"][INKWASH_COMPILED] = {"same pipeline as": INKWASH}
    write(result, args.json)

    for batch in args.batch_sizes:
        key = str(batch)
        entry: dict = {name: {"seconds_per_batch": []} for name in names}
        result["batches"][key] = entry
        runs: dict[str, Callable[[], None]] = {}
        for name in names:
            pipe = pipes.get(INKWASH if name == INKWASH_COMPILED else name)
            if pipe is None:
                entry[name]["error"] = (
                    "not loaded: " + result["libraries"][INKWASH if name == INKWASH_COMPILED else name]["error"]
                )
                continue
            runs[name] = runner(name, pipe, args, batch)
            try:  # warm-up (and compilation)
                entry[name]["warmup_seconds"] = round(timed(runs[name], args.device), 3)
            except Exception as error:
                entry[name]["error"] = error_text(error)
                traceback.print_exc()
                runs.pop(name)
        for _ in range(args.rounds):
            for name in list(runs):
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    baseline = torch.cuda.memory_allocated()
                try:
                    entry[name]["seconds_per_batch"].append(timed(runs[name], args.device))
                except Exception as error:
                    entry[name]["error"] = error_text(error)
                    traceback.print_exc()
                    runs.pop(name)
                    continue
                if args.device == "cuda":
                    own = result["libraries"][INKWASH if name == INKWASH_COMPILED else name].get("weights_mib", 0.0)
                    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 + own
                    entry[name]["peak_memory_mib"] = max(peak, entry[name].get("peak_memory_mib", 0.0))
            summarize(result, key, names)
            write(result, args.json)
        summarize(result, key, names)
        write(result, args.json)
        shown = ", ".join(
            f"{n} {entry[n]['seconds_per_image']:.4f} s/image" for n in names if entry[n].get("seconds_per_image")
        )
        print(f"batch {batch}: {shown or 'no timings'}", flush=True)

    if args.device == "cpu" and not args.no_memory:  # a fresh process for each library and batch size
        probes = [(name, batch) for batch in args.batch_sizes for name in (INKWASH, DIFFUSERS) if name in pipes]
        found = cpu_memory(args, probes)
        for (name, batch), (mib, problem) in zip(probes, found, strict=True):
            side = result["batches"][str(batch)][name]
            side["peak_memory_mib"] = mib
            if problem:
                side["memory_error"] = problem
            summarize(result, str(batch), names)
        write(result, args.json)

    result["complete"] = True
    print_table(result, names)
    write(result, args.json)
    failed = any(
        "error" in side for entry in result["batches"].values() for side in entry.values() if isinstance(side, dict)
    )
    failed = failed or any("error" in info for info in result["libraries"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
