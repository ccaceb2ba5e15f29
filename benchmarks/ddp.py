"""DDP scaling of inkwash's trainer on CPU: 2 processes against 1, at the same per-process batch.

Runs the real command line, ``python -m inkwash train --data digits`` (one process) and
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m inkwash train ...`` (two ranks,
gloo all-reduce), each process with one torch thread (``OMP_NUM_THREADS=1``), so that on a 2-core
machine the comparison is 1 process x 1 thread against 2 processes x 1 thread. Each rank takes
``--batch-size`` images per step, so the 2-process run trains on twice as many images per step.

- speed-up = DDP images/s / 1-process images/s; scaling efficiency = speed-up / 2;
- overhead = 1 - efficiency: the share of the ideal 2x lost, to communication, to the ranks waiting
  for each other, and to the machine (cores and memory bandwidth shared with each other and with any
  other work: on a machine where another job keeps one core busy, two processes get about 4/3 of a
  core's worth, not 2);
- communication, measured apart: two 1-thread gloo ranks all-reduce a float32 tensor as large as
  the model's gradients (what DDP sends each step; it overlaps part of it with the backward pass),
  as a share of the DDP step time;
- cores used: the runs' CPU time (all processes, start-up included) over their wall time, which shows
  how much of the machine each configuration actually got; images/s per core used, DDP against one
  process, separates DDP's own cost from the machine's (approximately: start-up is in the CPU time).

Images/s come from the trainer's own ``log.csv`` (the ``images_per_sec`` column, global over all
ranks, one row per ``--log-every`` steps, timed by rank 0). The first ``--warmup-rows`` rows are
skipped; the rest are combined as total images over total time (the harmonic mean of equal-step
intervals). Process start-up, data loading and the final checkpoint are outside every interval.
The two configurations alternate within each repeat (their order flips) and the medians are reported.

    python benchmarks/ddp.py [--steps 30] [--log-every 5] [--warmup-rows 2] [--repeats 2]
        [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SINGLE, DDP = "1 process", "2 processes (DDP)"


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def train_command(args: argparse.Namespace, out: Path, processes: int) -> list[str]:
    trainer = [
        *("-m", "inkwash", "train", "--data", "digits", "--preset", args.preset, "--device", "cpu"),
        *("--batch-size", str(args.batch_size), "--steps", str(args.steps), "--log-every", str(args.log_every)),
        *("--checkpoint-every", str(args.steps), "--out", str(out)),
    ]
    return [sys.executable, *trainer] if processes == 1 else [*torchrun(processes), *trainer]


def run(command: list[str], console: Path, timeout: float) -> tuple[float, float]:
    """Run to the end with one torch thread per process; (wall seconds, CPU seconds of all its processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with console.open("w", encoding="utf-8") as handle:
        try:
            done = subprocess.run(
                command, env=one_thread_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{' '.join(command)} ran past {timeout:.0f}s") from None
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = "\n".join(console.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise SystemExit(f"exit status {done.returncode} from: {' '.join(command)}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def logged_rate(out: Path, warmup_rows: int) -> tuple[float, int]:
    """Images/s over the rows of OUT/log.csv after the warm-up ones, and how many rows that is."""
    with (out / "log.csv").open(newline="", encoding="utf-8") as handle:
        rates = [float(row["images_per_sec"]) for row in csv.DictReader(handle)][warmup_rows:]
    if not rates:
        raise SystemExit(f"{out}/log.csv has no rows after the {warmup_rows} warm-up rows; raise --steps")
    return len(rates) / sum(1.0 / rate for rate in rates), len(rates)


def train_run(args: argparse.Namespace, name: str, folder: Path) -> dict:
    folder.mkdir(parents=True)
    load = os.getloadavg()[0]
    processes = 2 if name == DDP else 1
    wall, cpu = run(train_command(args, folder / "run", processes), folder / "console.txt", args.timeout)
    rate, rows = logged_rate(folder / "run", args.warmup_rows)
    return {
        "config": name,
        "images_per_sec": rate,
        "rows": rows,
        "wall_s": wall,
        "cores_used": cpu / wall,
        "load_before": load,
    }


def allreduce_worker(numel: int, repeats: int) -> None:
    """One rank of the communication measurement (launched by torchrun): seconds per all-reduce."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    gradients = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(gradients)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(gradients)
    seconds = (time.perf_counter() - start) / repeats
    if dist.get_rank() == 0:
        print(json.dumps({"allreduce_seconds": seconds}))
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int, folder: Path, timeout: float) -> float:
    console = folder / "allreduce.txt"
    run([*torchrun(2), __file__, "--allreduce-worker", str(numel), "--repeats", str(repeats)], console, timeout)
    for line in console.read_text(encoding="utf-8").splitlines():
        if line.startswith('{"allreduce_seconds"'):
            return json.loads(line)["allreduce_seconds"]
    raise SystemExit(f"the all-reduce measurement printed no result; see {console}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per log row (default: %(default)s)")
    parser.add_argument("--warmup-rows", type=int, default=2, help="log rows skipped (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (default: %(default)s)")
    parser.add_argument("--keep", default=None, help="keep the run directories and console logs here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--allreduce-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.log_every, args.repeats) < 1 or args.warmup_rows < 0:
        parser.error("--batch-size, --steps, --log-every and --repeats must be positive, --warmup-rows >= 0")
    if args.steps % args.log_every:
        parser.error("--steps must be a multiple of --log-every, so that every log row covers as many steps")
    if args.steps // args.log_every <= args.warmup_rows:
        parser.error("--steps / --log-every must be more than --warmup-rows")
    return args


def main() -> None:
    args = parse_args()
    if args.allreduce_worker is not None:
        allreduce_worker(args.allreduce_worker, 20)
        return
    from inkwash.core.unet import UNet, count_parameters, preset

    parameters = count_parameters(UNet(preset(args.preset)))
    runs = []
    with tempfile.TemporaryDirectory(prefix="inkwash-ddp-") as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        for repeat in range(args.repeats):
            for name in (SINGLE, DDP) if repeat % 2 == 0 else (DDP, SINGLE):
                result = train_run(args, name, root / f"repeat{repeat}" / ("ddp" if name == DDP else "single"))
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"repeat {repeat}  {name:18s} {result['images_per_sec']:7.1f} img/s  "
                    f"({result['wall_s']:.0f}s wall, {result['cores_used']:.2f} cores used, "
                    f"load {result['load_before']:.1f} before)",
                    flush=True,
                )
        communication = allreduce_seconds(parameters, 20, root, args.timeout)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == name)

    single, ddp = median(SINGLE, "images_per_sec"), median(DDP, "images_per_sec")
    speedup = ddp / single
    ddp_step = 2 * args.batch_size / ddp
    summary = {
        "single_images_per_sec": single,
        "ddp_images_per_sec": ddp,
        "ddp_images_per_sec_per_process": ddp / 2,
        "speedup": speedup,
        "efficiency": speedup / 2,
        "overhead": 1 - speedup / 2,
        "parameters": parameters,
        "allreduce_seconds": communication,
        "ddp_step_seconds": ddp_step,
        "allreduce_share_of_ddp_step": communication / ddp_step,
        "single_cores_used": median(SINGLE, "cores_used"),
        "ddp_cores_used": median(DDP, "cores_used"),
    }
    # Images/s per core the machine actually gave each configuration: DDP's own cost, apart from the
    # machine's (approximate: the cores are counted over the whole run, start-up included).
    summary["per_core_ratio"] = (ddp / summary["ddp_cores_used"]) / (single / summary["single_cores_used"])
    print(
        f"\npreset {args.preset}, batch {args.batch_size} per process, 1 torch thread per process, {args.steps} steps; "
        f"images/s from log.csv after {args.warmup_rows} warm-up rows of {args.log_every} steps; "
        f"medians of {args.repeats} repeats"
    )
    print(f"{'':18s} {'img/s':>7s} {'per process':>12s} {'vs 1 process':>13s} {'cores used':>11s}")
    for name, rate, processes in ((SINGLE, single, 1), (DDP, ddp, 2)):
        cores = median(name, "cores_used")
        print(f"{name:18s} {rate:7.1f} {rate / processes:12.1f} {rate / single:13.2f} {cores:11.2f}")
    print(
        f"speed-up {speedup:.2f}x, scaling efficiency {speedup / 2:.0%}, "
        f"overhead {1 - speedup / 2:.0%} of the ideal 2x lost (communication, waiting and the shared machine)"
    )
    print(
        f"per core used: DDP gets {summary['per_core_ratio']:.2f}x the images/s of 1 process "
        f"(so {1 - summary['per_core_ratio']:.0%} lost to DDP itself, the rest to the machine)"
    )
    print(
        f"communication: a gloo all-reduce of the {parameters:,} gradients takes {communication * 1e3:.1f} ms, "
        f"{communication / ddp_step:.1%} of a {ddp_step:.2f} s DDP step"
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "keep", "allreduce_worker")}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": settings, "runs": runs, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
