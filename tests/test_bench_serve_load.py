"""benchmarks/serve_load.py with tiny settings: it starts ``inkwash serve``, sends every kind of malformed
request beside valid ones for two rounds, and reports no 5xx, no failed connection and no timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"


def test_serve_load_runs_clean(tmp_path):
    out = tmp_path / "load.json"
    # 40 requests, 70% malformed: 28 of them, one of each kind at least.
    command = [
        sys.executable,
        str(SCRIPT),
        "--requests",
        "40",
        "--concurrency",
        "4",
        "--malformed-fraction",
        "0.7",
        "--steps",
        "2-3",
        "--rounds",
        "2",
        "--timeout",
        "60",
        "--json",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "machine: " in done.stdout and "RSS per round" in done.stdout

    result = json.loads(out.read_text())
    assert result["ok"] is True and result["failures"] == []
    assert result["machine"]
    assert result["config"]["requests"] == 40 and result["config"]["queue_size"] == 4
    assert len(result["rounds"]) == 2
    for summary in [*result["rounds"], result["total"]]:
        assert summary["5xx"] == 0 and summary["connection_errors"] == 0 and summary["timeouts"] == 0
        assert sum(summary["status_counts"].values()) == summary["requests"]
        assert summary["2xx"] + sum(summary["4xx"].values()) == summary["requests"]
        for group in ("valid_200", "malformed", "progress"):
            entry = summary["latency"][group]
            assert entry["n"] > 0 and 0 < entry["p50_ms"] <= entry["p99_ms"] <= entry["max_ms"]
    total = result["total"]
    assert total["requests"] == 80
    assert total["kinds"] == {"valid": 2 * 10, "malformed": 2 * 28, "progress": 2 * 2}
    assert total["status_counts"]["200"] == total["kinds"]["valid"] + total["kinds"]["progress"]
    variants = total["malformed_variants"]
    assert len(variants) >= 25
    for name, codes in variants.items():
        assert all(400 <= int(code) < 500 for code in codes), (name, codes)
    assert variants["oversized_body"] == {"413": 2} and variants["oversized_chunked"] == {"413": 2}
    assert variants["broken_json"] == {"400": 2}

    for summary in result["rounds"]:
        assert summary["rss"]["end_mb"] - summary["rss"]["start_mb"] == pytest.approx(summary["rss"]["growth_mb"])
    rss = result["rss"]
    assert 0 < rss["after_startup_mb"] <= rss["peak_mb"]
    assert len(rss["growth_per_round_mb"]) == 2 and isinstance(rss["bounded"], bool)
    assert rss["end_mb"] - rss["after_warmup_mb"] == pytest.approx(sum(rss["growth_per_round_mb"]), abs=1e-6)
