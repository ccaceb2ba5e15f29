#!/usr/bin/env bash
# Prepare a GPU run of benchmarks/gpu.sh. Run HERE, on a machine that reaches PyPI, from anywhere in the
# repository. It fills the ignored folder .gpu/ with what the GPU machine (no internet, PyTorch preinstalled)
# lacks, and prints the command that runs it there:
#
#   .gpu/wheels/*.whl  diffusers (pinned, as the benchmarks' published figures were measured on it) and the
#                      pure-Python packages `import diffusers` needs that a stock PyTorch image may lack;
#                      gpu.sh installs diffusers always and each other wheel only where the machine has no
#                      version of that package satisfying diffusers' requirement
#   .gpu/head.tar      `git archive` of HEAD: gpu.sh runs the committed code from it, not the working tree
#                      that others may be editing (gpu.sh --tree runs the working tree instead)
#   .gpu/commit.txt    HEAD's commit, date and subject, and how many files were uncommitted at the time
#
#   bash benchmarks/gpu_prepare.sh
#
# Settings (environment): PYTHON (default .venv/bin/python, else python3), GPU_PYTHON_VERSION (the GPU
# machine's Python, default 3.12), DIFFUSERS_VERSION (default 0.42.1), HUB_VERSION (huggingface_hub carried
# as a fallback, default 1.33.0, the version seen on the GPU machines; diffusers 0.42.1 needs >=1.32,<3),
# GPU_TRANSFORMERS_VERSION and GPU_TOKENIZERS_VERSION (the GPU image's, default 5.17.0 and 0.23.2: the check
# below uses them), GPU_PREPARE_CHECK=0 (skip that check).
#
# The check: Stable Diffusion needs transformers (CLIP) and tokenizers, which the GPU image has (5.17.0,
# 0.23.2) and which are not carried. The script downloads those two versions into a temporary folder, installs
# them there with the carried wheels (diffusers, huggingface_hub 1.33.0) and, with that folder first on the
# path, imports StableDiffusionPipeline and builds and runs a tiny random pipeline with inkwash against
# diffusers (benchmarks/sd_speed.py, 2 steps). A failed check is reported; it does not stop the preparation.
#
# Why only these: on Python >= 3.8 diffusers reads importlib.metadata from the standard library, so the
# importlib_metadata backport (a Requires-Dist of diffusers) is never imported; every other requirement
# (filelock, numpy, regex, requests, safetensors, Pillow) and huggingface_hub's own (httpx, hf-xet, click,
# fsspec, pyyaml, tqdm, packaging, typing-extensions) are on the GPU machines' image
# (/work/.library/device/KINDS.md). huggingface_hub is there too (1.33.0 seen); its wheel is a fallback.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
[[ $PY == */* && $PY != /* ]] && PY=$ROOT/$PY # the check below runs it from another folder
GPU_PY=${GPU_PYTHON_VERSION:-3.12}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
HUB_VERSION=${HUB_VERSION:-1.33.0}
GPU_TRANSFORMERS_VERSION=${GPU_TRANSFORMERS_VERSION:-5.17.0}
GPU_TOKENIZERS_VERSION=${GPU_TOKENIZERS_VERSION:-0.23.2}
GPU_DIR=.gpu

if ! git check-ignore -q "$GPU_DIR/"; then
    echo "gpu_prepare.sh: $GPU_DIR/ is not ignored by git; add '/.gpu/' to .gitignore first" >&2
    exit 1
fi

rm -rf "$GPU_DIR/wheels" "$GPU_DIR/head.tar" "$GPU_DIR/commit.txt"
mkdir -p "$GPU_DIR/wheels"

echo "downloading wheels for Python $GPU_PY into $GPU_DIR/wheels ..."
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PY" -d "$GPU_DIR/wheels" \
    "diffusers==$DIFFUSERS_VERSION" "huggingface_hub==$HUB_VERSION"

status=0
for wheel in "$GPU_DIR"/wheels/*.whl; do
    case $wheel in
        *-py3-none-any.whl) ;;
        *)
            echo "gpu_prepare.sh: $wheel is not a pure-Python (py3-none-any) wheel" >&2
            status=1
            ;;
    esac
done
[[ $status == 0 ]] || exit 1

check_gpu_image_versions() {
    local tmp rc=0
    tmp=$1
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp/dl" \
        "transformers==$GPU_TRANSFORMERS_VERSION" "tokenizers==$GPU_TOKENIZERS_VERSION" || return 1
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile --target "$tmp/site" \
        "$tmp"/dl/*.whl "$GPU_DIR"/wheels/*.whl || return 1
    (
        cd "$tmp" # not the repository: only the folder's packages and src come first on the path
        PYTHONPATH="$ROOT/src:$tmp/site" HF_HUB_OFFLINE=1 timeout 300 "$PY" -c '
import sys
import diffusers, huggingface_hub, tokenizers, transformers
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: F401
print(f"diffusers {diffusers.__version__} ({diffusers.__file__}), transformers {transformers.__version__}, "
      f"tokenizers {tokenizers.__version__}, huggingface_hub {huggingface_hub.__version__}")
for module, want in ((transformers, sys.argv[1]), (tokenizers, sys.argv[2])):
    assert module.__version__ == want, (module.__name__, module.__version__, want)
' "$GPU_TRANSFORMERS_VERSION" "$GPU_TOKENIZERS_VERSION" &&
            PYTHONPATH="$ROOT/src:$tmp/site" HF_HUB_OFFLINE=1 timeout 300 "$PY" "$ROOT/benchmarks/sd_speed.py" \
                --size tiny --device cpu --steps 2 --rounds 1 --batch-sizes 1 --no-memory --json "$tmp/sd.json" \
                >"$tmp/sd.log" 2>&1
    ) || rc=$?
    if ((rc)); then
        tail -n 15 "$tmp/sd.log" 2>/dev/null || true
        return "$rc"
    fi
    grep -E "^ +1 (inkwash|diffusers)|speed inkwash" "$tmp/sd.log" || true
}

if [[ ${GPU_PREPARE_CHECK:-1} == 1 ]]; then
    echo "checking the carried diffusers with the GPU image's transformers $GPU_TRANSFORMERS_VERSION and tokenizers $GPU_TOKENIZERS_VERSION ..."
    check_dir=$(mktemp -d "${TMPDIR:-/tmp}/inkwash_prepare.XXXXXX")
    if check_gpu_image_versions "$check_dir"; then
        echo "check: ok (StableDiffusionPipeline imports; sd_speed.py ran both libraries)"
    else
        echo "gpu_prepare.sh: WARNING: the check failed (above); the sd step may fail on the GPU machine" >&2
    fi
    rm -rf "$check_dir"
fi

git archive --format=tar -o "$GPU_DIR/head.tar" HEAD
uncommitted=$(git status --porcelain --untracked-files=no | wc -l | tr -d ' ')
{
    echo "commit $(git rev-parse HEAD)"
    echo "date $(git log -1 --format=%cI HEAD)"
    echo "subject $(git log -1 --format=%s HEAD | cut -c1-200)"
    echo "uncommitted_files_at_prepare $uncommitted"
    echo "prepared_utc $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$GPU_DIR/commit.txt"

echo
ls -l "$GPU_DIR"/wheels "$GPU_DIR"/head.tar
echo "total: $(du -sh "$GPU_DIR" | cut -f1) (the working tree and carried paths may be 64 MiB together)"
echo "HEAD: $(git log -1 --format='%h %s' HEAD | cut -c1-100)"
if [[ $uncommitted != 0 ]]; then
    echo "note: $uncommitted tracked files differ from HEAD; gpu.sh runs HEAD (head.tar) unless given --tree"
fi
cat <<'EOF'

Run it on the GPU machine with the device tool (at most 530 s of script time, plus the summary):
  run(command="bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=540)
Fewer or other steps, e.g. a second call for the torch.compile timings alone:
  run(command="GPU_SH_STEPS='machine peak throughput_compile' bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=540)
and the same with cuDNN's benchmark mode on for inkwash's tasks:
  run(command="GPU_SH_STEPS='machine peak throughput_compile' GPU_SH_COMPILE_ARGS=--cudnn-benchmark bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=540)
Everything comes back under $OUT: summary.json, pytest.log, junit.xml and steps.tar.gz (every step's log and JSON).
Check the plumbing here first, on the CPU:  bash benchmarks/gpu.sh --dry-run
EOF
