#!/usr/bin/env bash
# One GPU session's measurements, within 9 minutes (530 s), on a fresh machine with one NVIDIA GPU and PyTorch
# installed but no internet: the machine, the chip's matmul peak, benchmarks/throughput.py (inkwash against
# diffusers, fp32 against bf16, FLOPs and MFU), the tests that run on the GPU, bf16 under torch.compile with
# CUDA graphs at batch 512 (contiguous and channels_last), then benchmarks/sd_speed.py (Stable Diffusion 1.5's
# shapes, inkwash against diffusers) with the time left, each step under its own `timeout`, a failed step not
# stopping the others. Prepare it HERE first with benchmarks/gpu_prepare.sh (wheels and a `git archive` of HEAD
# in .gpu/), then run it there from the repository root:
#
#   bash benchmarks/gpu.sh             # on the GPU machine (run tool: carry .gpu, timeout_s 540)
#   bash benchmarks/gpu.sh --dry-run   # here, on the CPU: every step with --device cpu and tiny settings
#
# Options: --dry-run (or GPU_SH_CPU_CHECK=1): the CPU check; --head: run the code in .gpu/head.tar (the
# default when it exists); --tree: run the working tree as it is. Environment: OUT (where everything goes,
# default gpu_out), PYTHON (default .venv/bin/python where it exists, else python3), GPU_SH_STEPS (the steps
# to run, default all: machine peak throughput pytest throughput_compile sd precision_large),
# GPU_SH_BUDGET_S (no step runs past this many seconds from the start, default 530), GPU_SH_SOFT_S (optional
# steps are skipped once this many seconds have passed, default 490), GPU_SH_WHEELS=all (install every
# carried wheel, not only the missing ones), GPU_SH_COMPILE_ARGS (more throughput.py options for the compile
# step, e.g. --cudnn-benchmark), GPU_SH_PYTEST_ARGS (replaces the test selection: files, -k ...),
# GPU_SH_PYTEST_WORKERS (xdist workers on the GPU, default 8), GPU_SH_KEEP_WORK=1 (keep the temporary folder).
#
# Writes under $OUT: summary.json (machine, peak TFLOP/s, each benchmark's JSON, the test summary, each
# step's status, exit code and seconds, the end of each failed step's log), pytest.log, junit.xml and
# steps.tar.gz (steps/: every step's log and JSON). Exit status: 0 when every step that ran passed, 1 when
# one failed or timed out, 2 for a usage error. Never touches the network.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=0
[[ ${GPU_SH_CPU_CHECK:-0} == 1 ]] && DRY=1
SOURCE=auto
while (($#)); do
    case $1 in
        --dry-run | --cpu-check) DRY=1 ;;
        --head) SOURCE="head" ;;
        --tree) SOURCE="tree" ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "gpu.sh: unknown argument '$1' (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

GPU_DIR=$ROOT/.gpu
if [[ $SOURCE == auto ]]; then
    if [[ -f $GPU_DIR/head.tar ]]; then SOURCE="head"; else SOURCE="tree"; fi
fi
if [[ $SOURCE == head && ! -f $GPU_DIR/head.tar ]]; then
    echo "gpu.sh: --head, but there is no $GPU_DIR/head.tar (run benchmarks/gpu_prepare.sh here first)" >&2
    exit 2
fi

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi

ALL_STEPS="machine peak throughput pytest throughput_compile sd precision_large"
STEPS_WANTED=${GPU_SH_STEPS:-$ALL_STEPS}
for step in $STEPS_WANTED; do
    if [[ " $ALL_STEPS " != *" $step "* ]]; then
        echo "gpu.sh: unknown step '$step' in GPU_SH_STEPS; the steps: $ALL_STEPS" >&2
        exit 2
    fi
done
BUDGET=${GPU_SH_BUDGET_S:-530}
SOFT=${GPU_SH_SOFT_S:-490}
MIN_STEP=30   # a step is not started with less than this many seconds of the budget left
KILL_AFTER=10 # timeout's grace between TERM and KILL

if ((DRY)); then
    MODE=cpu-check
    DEVICE=cpu
    PRESET=tiny
    BATCH=8
    BATCH_SMALL=8
    BATCH_LARGE=16
    ROUNDS=1
    BENCH_EXTRA=(--train-steps 1 --sample-steps 2)
    PEAK_N=512
    PEAK_REPS=3
    PYTEST_WORKERS=2
    PYTEST_DEFAULT=(tests/test_diffusers_agreement.py)
    SD_SIZE=tiny
    SD_ARGS=(--size tiny --device cpu --precision fp32 --steps 2 --batch-sizes "1,2" --rounds 1)
    COMPILE_ROUNDS=1
else
    MODE=gpu
    DEVICE=cuda
    PRESET=rgb32
    BATCH=128
    BATCH_SMALL=128
    BATCH_LARGE=512
    ROUNDS=3
    BENCH_EXTRA=()
    PEAK_N=8192
    PEAK_REPS=5
    PYTEST_WORKERS=${GPU_SH_PYTEST_WORKERS:-8}
    # The tests whose code runs on the GPU when there is one (the trainer's device is auto: determinism and
    # exact resume; precision and its CUDA switches; Inception's loading and TF32 settings).
    PYTEST_DEFAULT=(tests/test_resume.py tests/test_precision.py tests/test_inception.py)
    SD_SIZE=sd15
    SD_ARGS=(--size sd15 --device cuda --precision fp16 --steps 20 --batch-sizes "1,4" --rounds 3)
    COMPILE_ROUNDS=2
fi
COMPILE_EXTRA=()
if [[ -n ${GPU_SH_COMPILE_ARGS:-} ]]; then read -r -a COMPILE_EXTRA <<<"$GPU_SH_COMPILE_ARGS"; fi
if [[ -n ${GPU_SH_PYTEST_ARGS:-} ]]; then
    read -r -a PYTEST_SELECT <<<"$GPU_SH_PYTEST_ARGS"
else
    PYTEST_SELECT=("${PYTEST_DEFAULT[@]}")
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=$OUT/steps
rm -rf "$STEPS" "$OUT/steps.tar.gz" "$OUT/summary.json" "$OUT/pytest.log" "$OUT/junit.xml"
mkdir -p "$STEPS"
STEP_TSV=$STEPS/steps.tsv
: >"$STEP_TSV"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/inkwash_gpu.XXXXXX")
SITE=$WORK/site
mkdir -p "$SITE"
FINISHED=0
FAILED=0

now() { date +%s.%N; }
say() { printf '[gpu.sh %3ds] %s\n' "$SECONDS" "$*"; }

# --- the Python helpers (written to $WORK, so that only results land in $OUT) ---------------------------

cat >"$WORK/wheels.py" <<'PYEOF'
"""Which carried wheels to install: diffusers always; another only where this Python has no version of that
distribution satisfying diffusers' requirement on it. Prints the paths; writes the decisions as JSON."""
import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

wheel_dir, out, install_all = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "all"


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
requirements = {}
for wheel in wheels:
    if norm(wheel.name.split("-")[0]) != "diffusers":
        continue
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode("utf-8", "replace").splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            from packaging.requirements import Requirement

            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                requirements[norm(req.name)] = str(req.specifier)
        except Exception:  # no packaging here: presence alone decides
            pass

decisions, chosen = [], []
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    spec = requirements.get(norm(name), "")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if install_all:
        install, why = True, "GPU_SH_WHEELS=all"
    elif norm(name) == "diffusers":
        install, why = True, "pinned: always installed"
    elif have is None:
        install, why = True, "not installed here"
    else:
        try:
            from packaging.specifiers import SpecifierSet

            ok = SpecifierSet(spec).contains(have, prereleases=True)
        except Exception:
            ok = True
        install, why = (False, f"{have} here satisfies '{spec or 'any'}'") if ok else (True, f"{have} here fails '{spec}'")
    decisions.append({"wheel": wheel.name, "version": version, "installed_here": have, "install": install, "why": why})
    if install:
        chosen.append(str(wheel))
with open(out, "w", encoding="utf-8") as handle:
    json.dump({"wheel_dir": str(wheel_dir), "wheels": decisions}, handle, indent=2)
print("\n".join(chosen))
PYEOF

cat >"$WORK/machine.py" <<'PYEOF'
"""The machine, the software and the code under test, as JSON."""
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata

out, source, code, commit_file, tar, site = sys.argv[1:7]
info = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "hostname": socket.gethostname(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "python": sys.version.split()[0],
    "python_executable": sys.executable,
}

code_info = {"source": source, "dir": code}
if commit_file and os.path.isfile(commit_file):
    prepared = {"file": commit_file}
    with open(commit_file, encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.rstrip("\n").partition(" ")
            prepared[key] = value
    if source == "head":  # head.tar was made from this commit
        code_info.update((k, v) for k, v in prepared.items() if k != "file")
        code_info["commit_file"] = commit_file
    else:  # only where HEAD was when .gpu was prepared
        code_info["gpu_prepare"] = prepared
if shutil.which("git"):
    if source == "head" and os.path.isfile(tar):
        with open(tar, "rb") as handle:
            r = subprocess.run(["git", "get-tar-commit-id"], stdin=handle, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            code_info["tar_commit"] = r.stdout.strip()
    elif source == "tree":
        r = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0:
            code_info["commit"] = r.stdout.strip()
            d = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
            code_info["modified_files"] = len(d.stdout.splitlines())
if source == "tree":
    code_info["note"] = "the working tree as copied: it may differ from any commit"
info["code"] = code_info

query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
try:
    r = subprocess.run(query, capture_output=True, text=True, timeout=30)
    lines = [line.strip() for line in r.stdout.strip().splitlines() if line.strip()]
    rows = []
    if r.returncode == 0 and len(lines) > 1:
        header = [h.strip() for h in lines[0].split(",")]
        rows = [dict(zip(header, (v.strip() for v in line.split(",")))) for line in lines[1:]]
    info["nvidia_smi"] = {"rc": r.returncode, "csv": r.stdout.strip(), "gpus": rows, "stderr": r.stderr.strip()[-500:]}
except (FileNotFoundError, subprocess.TimeoutExpired) as error:
    info["nvidia_smi"] = {"error": repr(error)}

import torch

t = {
    "version": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cuda_available": torch.cuda.is_available(),
    "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    "file": torch.__file__,
}
if torch.cuda.is_available():
    t["bf16_supported"] = torch.cuda.is_bf16_supported()
    t["devices"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        t["devices"].append({
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 2),
        })
info["torch"] = t

packages = {}
for name in ["diffusers", "huggingface_hub", "transformers", "tokenizers", "accelerate", "numpy", "safetensors",
             "pillow", "scipy", "triton", "pytest", "pytest-xdist", "pytest-timeout"]:
    try:
        packages[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        packages[name] = None
info["packages"] = packages

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: F401 (what the benchmark uses)
    import huggingface_hub

    info["diffusers"] = {
        "version": diffusers.__version__,
        "file": diffusers.__file__,
        "from_carried_wheel": os.path.realpath(diffusers.__file__).startswith(os.path.realpath(site)),
        "huggingface_hub": huggingface_hub.__version__,
        "huggingface_hub_file": huggingface_hub.__file__,
    }
except Exception as error:  # recorded, not fatal: the precision-only steps and most tests need no diffusers
    info["diffusers"] = {"error": repr(error)}

try:
    import inkwash

    info["inkwash_file"] = inkwash.__file__
except Exception as error:
    info["inkwash_file"] = repr(error)

with open(out, "w", encoding="utf-8") as handle:
    json.dump(info, handle, indent=2)
print(json.dumps(info, indent=2))
PYEOF

cat >"$WORK/peak.py" <<'PYEOF'
"""Matmul peak of the chip: n x n x n products in bf16, strict fp32 and TF32, on random data, after
warm-up; on a GPU timed with CUDA events. Best and median of 5 blocks of `reps` products, in TFLOP/s."""
import json
import statistics
import sys
import time

import torch

device, n, reps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cuda = device == "cuda"
variants = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
if cuda:
    variants.append(("tf32", torch.float32, True))
result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "n": n, "reps_per_block": reps, "blocks": 5}
previous_tf32 = torch.backends.cuda.matmul.allow_tf32
for name, dtype, tf32 in variants:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    seconds = []
    for _ in range(5):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1000 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            seconds.append((time.perf_counter() - t0) / reps)
    flops = 2 * n**3
    result[name] = {
        "tflops_best": flops / min(seconds) / 1e12,
        "tflops_median": flops / statistics.median(seconds) / 1e12,
        "ms_per_matmul_best": min(seconds) * 1e3,
    }
    print(f"{name:5s} {n}^3: {result[name]['tflops_best']:8.1f} TFLOP/s best, {result[name]['tflops_median']:8.1f} median")
    del a, b, c
torch.backends.cuda.matmul.allow_tf32 = previous_tf32
with open(out, "w", encoding="utf-8") as handle:
    json.dump(result, handle, indent=2)
PYEOF

cat >"$WORK/summary.py" <<'PYEOF'
"""Collect the steps' results into summary.json and print a short account."""
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, steps_dir, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])


def load(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def tail(path, lines=30):
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


steps = []
for line in (steps_dir / "steps.tsv").read_text(encoding="utf-8").splitlines():
    name, status, rc, t0, t1, limit, log, reason, cmd = line.split("\t")
    step = {"name": name, "status": status, "rc": int(rc) if rc else None, "limit_s": int(limit) if limit else None}
    if t0 and t1:
        step["seconds"] = round(float(t1.replace(",", ".")) - float(t0.replace(",", ".")), 2)
    if reason:
        step["reason"] = reason
    if cmd:
        step["command"] = cmd
    if log:
        step["log"] = log
        if status not in ("ok", "skipped"):
            step["log_tail"] = tail(steps_dir / Path(log).name)
    steps.append(step)

benchmarks = {}
for path in sorted(steps_dir.glob("*.json")):
    if path.stem not in ("machine", "peak", "wheels"):
        benchmarks[path.stem] = load(path)

peak = load(steps_dir / "peak.json")
tests = {}
log = steps_dir / "pytest.log"
if log.exists():
    pattern = re.compile(r"\b(\d+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)|no tests ran)\b.* in [\d.]+s")
    for line in reversed(log.read_text(encoding="utf-8", errors="replace").splitlines()):
        if pattern.search(line):
            tests["summary_line"] = line.strip("= ").strip()
            break
    else:
        tests["summary_line"] = None
junit = out / "junit.xml"
if junit.exists():
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        tests["junit"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        problems = []
        for case in root.iter("testcase"):
            for kind in ("failure", "error"):
                node = case.find(kind)
                if node is not None:
                    where = "::".join(x for x in (case.get("classname"), case.get("name")) if x)
                    message = (node.get("message") or "").strip().splitlines()[:1]
                    detail = [x[1:].strip() for x in (node.text or "").splitlines() if x.startswith("E ")][-1:]
                    text = ": ".join(x for x in message + detail if x)
                    problems.append({"test": where, "kind": kind, "message": text[:300]})
        tests["problems"] = problems[:50]
        tests["problems_total"] = len(problems)
    except ET.ParseError as error:
        tests["junit"] = {"error": repr(error)}

summary = {
    "script": "benchmarks/gpu.sh",
    "settings": settings,
    "commit": ((load(steps_dir / "machine.json") or {}).get("code") or {}).get("commit"),
    "machine": load(steps_dir / "machine.json"),
    "wheels": load(steps_dir / "wheels.json"),
    "peak_tflops": peak,
    "benchmarks": benchmarks,
    "tests": tests,
    "steps": steps,
    "files": "summary.json, pytest.log, junit.xml, steps.tar.gz (steps/: every step's log and JSON)",
}
with open(out / "summary.json", "w", encoding="utf-8") as handle:
    json.dump(summary, handle, indent=2)

print(f"== gpu.sh summary ({settings['mode']}, {settings['elapsed_s']} s of {settings['budget_s']} s) ==")
machine = summary["machine"] or {}
gpus = (machine.get("nvidia_smi") or {}).get("gpus") or []
torch_info = machine.get("torch") or {}
print(f"machine: {', '.join(' / '.join(g.values()) for g in gpus) or 'no nvidia-smi'}; torch {torch_info.get('version')} "
      f"(CUDA {torch_info.get('cuda')}); diffusers {(machine.get('diffusers') or {}).get('version')}; "
      f"code {(machine.get('code') or {}).get('commit', '?')[:12]} ({settings['source']})")
if peak:
    print("peak: " + ", ".join(f"{k} {v['tflops_best']:.3g}" for k, v in peak.items() if isinstance(v, dict)) + " TFLOP/s")


def num(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def sd_line(name, result):
    parts = []
    for batch, entry in (result.get("batches") or {}).items():
        ours, theirs = entry.get("inkwash") or {}, entry.get("diffusers") or {}
        text = (f"batch {batch}: s/image inkwash {num(ours.get('seconds_per_image'))}, diffusers "
                f"{num(theirs.get('seconds_per_image'))}, speed x{num(entry.get('speed_ratio'), '.2f')}; peak MiB "
                f"{num(ours.get('peak_memory_mib'), '.0f')} / {num(theirs.get('peak_memory_mib'), '.0f')}")
        errors = [f"{side} error" for side in ("inkwash", "diffusers") if "error" in (entry.get(side) or {})]
        parts.append(text + (f" ({', '.join(errors)})" if errors else ""))
    built = (result.get("folder") or {}).get("build_seconds")
    head = f"{name} ({result.get('size')}, {result.get('precision')}, {result.get('steps')} steps, built in {num(built)} s)"
    return head + ": " + ("; ".join(parts) or "no timings") + ("" if result.get("complete") else " [incomplete]")


def throughput_line(name, result):
    rates = []
    for k, v in (result.get("precision") or {}).items():
        mfu = f" (x{num(v.get('train_vs_fp32'), '.2f')} fp32" + (f", MFU {num(v.get('train_mfu'), '.2f')})" if "train_mfu" in v else ")")
        rates.append(f"{k} train {num(v.get('train_images_per_sec'), '.0f')}{mfu} / sample {num(v.get('sample_images_per_sec'), '.0f')}")
    ratio = f"; inkwash/diffusers train {result['train_ratio']:.2f}, sample {result['sample_ratio']:.2f}" if "train_ratio" in result else ""
    mode = f", compile {result['compile_mode']}" if result.get("compile_mode") else ""
    cut = "" if result.get("complete", True) else " [incomplete]"
    return f"{name} (batch {result.get('batch_size')}{mode}): img/s {', '.join(rates)}{ratio}{cut}"


for name, result in benchmarks.items():
    if not isinstance(result, dict):
        continue
    try:
        print(sd_line(name, result) if result.get("script") == "benchmarks/sd_speed.py" else throughput_line(name, result))
    except Exception as error:  # the summary must not fail on an odd result
        print(f"{name}: could not summarize ({error!r})")
print(f"tests: {tests.get('summary_line')}")
for step in steps:
    extra = f" ({step['reason']})" if "reason" in step else ""
    print(f"  {step['name']:20s} {step['status']:8s} rc={step['rc']} {step.get('seconds', '-')} s{extra}")
PYEOF

# --- steps ---------------------------------------------------------------------------------------------

# record NAME STATUS RC T0 T1 LIMIT LOG REASON CMD
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEP_TSV"
}

# run_step NAME LIMIT_S required|optional CMD... : runs CMD in the code's folder under `timeout`, its output
# in $STEPS/NAME.log; skipped when not selected, when optional and past the soft limit, or when too little
# of the budget is left; the limit shrinks to what the budget leaves.
run_step() {
    local name=$1 limit=$2 kind=$3
    shift 3
    local log=$STEPS/$name.log cmd elapsed=$SECONDS remaining rc=0 status t0 t1
    cmd=$(printf '%q ' "$@")
    if [[ " $ALL_STEPS " == *" $name "* && " $STEPS_WANTED " != *" $name "* ]]; then
        record "$name" skipped "" "" "" "" "" "not in GPU_SH_STEPS" "$cmd"
        return 0
    fi
    if [[ $kind == optional ]] && ((elapsed >= SOFT)); then
        record "$name" skipped "" "" "" "" "" "optional, and ${elapsed}s had passed (soft limit ${SOFT}s)" "$cmd"
        say "$name: skipped (past the soft limit)"
        return 0
    fi
    remaining=$((BUDGET - elapsed - KILL_AFTER))
    if ((remaining < MIN_STEP)); then
        record "$name" skipped "" "" "" "" "" "only ${remaining}s of the budget left" "$cmd"
        say "$name: skipped (only ${remaining}s left)"
        return 0
    fi
    ((limit > remaining)) && limit=$remaining
    say "$name (limit ${limit}s): $cmd"
    t0=$(now)
    # In the background and waited for, so that a TERM to this script is handled at once (on_signal).
    (cd "$CODE" && exec timeout -k "$KILL_AFTER" "$limit" "$@") >"$log" 2>&1 &
    CURRENT_PID=$! CURRENT_STEP=$name CURRENT_T0=$t0
    wait "$CURRENT_PID" || rc=$?
    CURRENT_PID="" CURRENT_STEP=""
    t1=$(now)
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $status == ok ]] || FAILED=1
    record "$name" "$status" "$rc" "$t0" "$t1" "$limit" "steps/$name.log" "" "$cmd"
    say "$name: $status (exit $rc)"
    if [[ $status != ok ]]; then tail -n 8 "$log" | sed 's/^/    | /'; fi
}

finish() {
    local settings
    settings=$("$PY" -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' \
        "mode=$MODE" "source=$SOURCE" "device=$DEVICE" "preset=$PRESET" "batch_size=$BATCH" \
        "memory_batches=$BATCH_SMALL,$BATCH_LARGE" "compile_batch=$BATCH_LARGE" "compile_rounds=$COMPILE_ROUNDS" \
        "sd=${SD_ARGS[*]}" "rounds=$ROUNDS" "steps=$STEPS_WANTED" \
        "budget_s=$BUDGET" "soft_s=$SOFT" "elapsed_s=$SECONDS" "python=$PY" "out=$OUT") || settings='{}'
    [[ -f $STEPS/pytest.log ]] && cp "$STEPS/pytest.log" "$OUT/pytest.log"
    "$PY" "$WORK/summary.py" "$OUT" "$STEPS" "$settings" || echo "gpu.sh: summary.py failed" >&2
    # At most 8 files come back from the device machine: keep the loose files few, the rest in one archive.
    if tar -czf "$OUT/steps.tar.gz" -C "$OUT" steps; then rm -rf "$STEPS"; fi
    FINISHED=1
}

# shellcheck disable=SC2317  # reached through the EXIT trap
on_exit() {
    local rc=$?
    set +e
    if ((!FINISHED)); then
        echo "gpu.sh: stopped early (exit $rc); writing what there is" >&2
        finish
        ((rc == 0)) && rc=1
    fi
    if [[ ${GPU_SH_KEEP_WORK:-0} == 1 ]]; then echo "gpu.sh: kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
# shellcheck disable=SC2317  # reached through the TERM and INT traps
on_signal() {
    if [[ -n $CURRENT_PID ]]; then
        kill -TERM "$CURRENT_PID" 2>/dev/null || true # timeout passes it on to the step's processes
        record "$CURRENT_STEP" interrupted "$2" "$CURRENT_T0" "$(now)" "" "steps/$CURRENT_STEP.log" \
            "gpu.sh got SIG$1 during this step" ""
        FAILED=1
    fi
    exit "$2"
}
CURRENT_PID="" CURRENT_STEP="" CURRENT_T0=""
trap on_exit EXIT
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

say "mode $MODE, code from $SOURCE, out $OUT, python $PY, budget ${BUDGET}s (optional steps until ${SOFT}s)"

if [[ $SOURCE == head ]]; then
    if repo_head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) && [[ -f $GPU_DIR/commit.txt ]] &&
        ! grep -qx "commit $repo_head" "$GPU_DIR/commit.txt"; then
        say "note: .gpu/head.tar is not the repository's HEAD ($repo_head); run benchmarks/gpu_prepare.sh again for it"
    fi
    CODE=$WORK/head
    mkdir -p "$CODE"
    tar -xf "$GPU_DIR/head.tar" -C "$CODE"
    COMMIT_FILE=$GPU_DIR/commit.txt
else
    CODE=$ROOT
    COMMIT_FILE=""
    [[ -f $GPU_DIR/commit.txt ]] && COMMIT_FILE=$GPU_DIR/commit.txt # where HEAD was when .gpu was prepared
fi

# Offline, quiet, reproducible: the carried wheels and the code under test first on the path.
export PYTHONPATH="$CODE/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg PIP_NO_INDEX=1 \
    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

# The wheels: the choice, then pip, both as one step.
WHEELS=()
if "$PY" "$WORK/wheels.py" "$GPU_DIR/wheels" "$STEPS/wheels.json" "${GPU_SH_WHEELS:-missing}" >"$WORK/wheels.txt" \
    2>"$STEPS/wheels_choice.log"; then
    mapfile -t WHEELS <"$WORK/wheels.txt"
else
    record wheel_choice failed 1 "" "" "" steps/wheels_choice.log "" "$PY wheels.py"
    FAILED=1
    say "wheel_choice: failed"
    sed 's/^/    | /' "$STEPS/wheels_choice.log"
fi
if ((${#WHEELS[@]})); then
    run_step wheels 60 required "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}"
else
    record wheels skipped "" "" "" "" "" "no wheels in $GPU_DIR/wheels to install (benchmarks/gpu_prepare.sh)" ""
    say "wheels: none to install"
fi

run_step machine 45 required "$PY" "$WORK/machine.py" "$STEPS/machine.json" "$SOURCE" "$CODE" "$COMMIT_FILE" \
    "$GPU_DIR/head.tar" "$SITE"
run_step peak 45 required "$PY" "$WORK/peak.py" "$DEVICE" "$PEAK_N" "$PEAK_REPS" "$STEPS/peak.json"

BENCH_BASE=("$PY" benchmarks/throughput.py --device "$DEVICE" --preset "$PRESET" "${BENCH_EXTRA[@]}")
BENCH=("${BENCH_BASE[@]}" --rounds "$ROUNDS")
# Where throughput.py measures peak memory (a fresh process per task and batch size, some seconds each on a
# GPU), only the first run does, at the two batch sizes timed here; the others skip it.
MEMORY_MAIN=() MEMORY_OFF=()
if grep -q -- '--memory-batch-sizes' "$CODE/benchmarks/throughput.py"; then
    MEMORY_MAIN=(--memory-batch-sizes "$BATCH_SMALL,$BATCH_LARGE")
    MEMORY_OFF=(--memory-batch-sizes "")
fi
# The chip's measured bf16 matmul peak (the peak step), for throughput.py's model FLOPs utilization (MFU).
PEAK_ARGS=()
if grep -q -- '--peak-tflops' "$CODE/benchmarks/throughput.py" &&
    peak_bf16=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["bf16"]["tflops_best"])' \
        "$STEPS/peak.json" 2>/dev/null); then
    PEAK_ARGS=(--peak-tflops "$peak_bf16")
fi
run_step throughput 130 required "${BENCH[@]}" "${MEMORY_MAIN[@]}" "${PEAK_ARGS[@]}" --batch-size "$BATCH" \
    --json "$STEPS/throughput_$PRESET.json"

# pyproject.toml's addopts already say -q (a second -q would drop the summary line); -n below overrides its -n.
PYTEST=("$PY" -m pytest --durations 10 -p no:cacheprovider --continue-on-collection-errors --junitxml "$OUT/junit.xml")
if "$PY" -c 'import xdist' 2>/dev/null; then
    PYTEST+=(-n "$PYTEST_WORKERS")
else
    PYTEST+=(-o "addopts=-q") # pyproject's addopts asks for xdist's -n
fi
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then PYTEST+=(--timeout 60); fi
run_step pytest 70 required "${PYTEST[@]}" "${PYTEST_SELECT[@]}"

# bf16 under torch.compile with CUDA graphs (mode reduce-overhead) at the large batch, against fp32, bf16 and
# diffusers at that batch: issue 21's targets (bf16 / fp32, MFU, inkwash / diffusers); every variant but the
# fp32 baseline also in channels_last (NHWC), the layout cuDNN's tensor-core convolutions want. Gets what is
# left; compilation alone took 58-167 s per variant on earlier GPU runs. Each compiled variant is timed once as
# soon as it is compiled, and throughput.py writes what it measured when cut short.
run_step throughput_compile 400 optional "${BENCH_BASE[@]}" "${MEMORY_OFF[@]}" "${PEAK_ARGS[@]}" \
    --compile --compile-mode reduce-overhead --compile-precisions bf16 --rounds "$COMPILE_ROUNDS" \
    --memory-formats contiguous,channels_last "${COMPILE_EXTRA[@]}" \
    --batch-size "$BATCH_LARGE" --json "$STEPS/throughput_${PRESET}_b${BATCH_LARGE}_compile.json"

# Stable Diffusion 1.5's shapes (random weights, built on the GPU), inkwash against diffusers, DPM++ 2M. Measured
# on 2026-11-28 (docs/results.md), so it comes after the compile step and takes what that leaves.
run_step sd 150 optional "$PY" benchmarks/sd_speed.py "${SD_ARGS[@]}" --json "$STEPS/sd_$SD_SIZE.json"
run_step precision_large 60 optional "${BENCH[@]}" "${MEMORY_OFF[@]}" "${PEAK_ARGS[@]}" --precision-only \
    --batch-size "$BATCH_LARGE" --json "$STEPS/precision_${PRESET}_b$BATCH_LARGE.json"

finish
say "done: $OUT"
exit "$FAILED"
