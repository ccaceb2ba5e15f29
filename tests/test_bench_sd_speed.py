"""benchmarks/sd_speed.py end to end on the CPU: a tiny random Stable Diffusion folder, both libraries, two batch
sizes, in a subprocess as gpu.sh runs it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sd_speed.py"


def inkwash_loads_stable_diffusion() -> bool:
    return importlib.util.find_spec("inkwash.interop.stable_diffusion") is not None


@pytest.mark.skipif(
    not inkwash_loads_stable_diffusion(),
    reason="inkwash's Stable Diffusion loader (inkwash.interop.stable_diffusion) is not written yet",
)
def test_sd_speed_measures_both_libraries_at_both_batch_sizes(tmp_path):
    out = tmp_path / "sd.json"
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--steps", "2", "--rounds", "1",
               "--batch-sizes", "1,2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["complete"] and result["folder"]["built"]
    assert set(result["libraries"]) == {"inkwash", "diffusers"}
    assert all("error" not in info for info in result["libraries"].values()), result["libraries"]
    assert set(result["batches"]) == {"1", "2"}
    for entry in result["batches"].values():
        for name in ("inkwash", "diffusers"):
            side = entry[name]
            assert "error" not in side, side
            assert side["seconds_per_image"] > 0 and side["images_per_sec"] > 0
            assert side["peak_memory_mib"] > 0, side
        assert entry["speed_ratio"] > 0 and entry["memory_ratio"] > 0
    assert "inkwash/diffusers" in done.stdout
