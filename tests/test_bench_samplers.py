import json
import subprocess
import sys

import numpy as np
import torch

from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.evaluation.oracle import load_gmm
from inkwash.evaluation.sampler_bench import bench_samplers, run_sampler


def test_more_steps_get_closer_to_the_floor():
    gmm = load_gmm("gmm2d")
    rows = bench_samplers(gmm, ["euler", "heun"], [2, 30], num_samples=3000, show_progress=False)
    by_key = {(r.sampler, r.steps): r for r in rows}
    for sampler in ("euler", "heun"):
        assert by_key[(sampler, 30)].swd < by_key[(sampler, 2)].swd
        assert by_key[(sampler, 30)].mode_error < by_key[(sampler, 2)].mode_error + 0.02
    assert by_key[("heun", 30)].swd < 2.0 * rows[0].floor
    assert by_key[("heun", 30)].nfe == 59  # two per step, one on the last


def test_held_out_mixture_runs_through_the_bench():
    """gmm48, the held-out check of the default schedules, in 48 dimensions: the bench samples it and more
    steps get closer to its floor."""
    gmm = load_gmm("gmm48")
    rows = bench_samplers(gmm, ["heun"], [2, 30], num_samples=2000, show_progress=False)
    few, many = rows
    assert (few.steps, many.steps) == (2, 30)
    assert many.swd < few.swd
    assert many.swd < 2.0 * many.floor
    assert many.mode_error < 0.05


def test_run_sampler_is_seeded():
    gmm = load_gmm("gmm2d")
    sigmas = build_sigmas(NoiseSchedule(), 5, "karras")
    a, nfe = run_sampler(gmm, "euler_ancestral", sigmas, 100, seed=3)
    b, _ = run_sampler(gmm, "euler_ancestral", sigmas, 100, seed=3)
    assert torch.equal(a, b) and nfe == 5


def test_cli_writes_table_json_plot_and_samples(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "inkwash",
            "bench",
            "samplers",
            "--gmm",
            "gmm2d",
            "--samplers",
            "ddim,DPM++ 2M",
            "--steps",
            "2,4",
            "--num-samples",
            "400",
            "--json",
            str(tmp_path / "b.json"),
            "--save-samples",
            str(tmp_path / "s"),
            "--plot",
            str(tmp_path / "b.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "dpmpp_2m" in result.stdout and "floor" in result.stdout
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in results] == [
        ("ddim", 2, 2),
        ("ddim", 4, 4),
        ("dpmpp_2m", 2, 2),
        ("dpmpp_2m", 4, 4),
    ]
    saved = np.load(tmp_path / "s" / "dpmpp_2m_4.npy")
    assert saved.shape == (400, 2) and saved.dtype == np.float32
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_cli_bad_inputs(tmp_path):
    for args, fragment in (
        (["--gmm", str(tmp_path / "none.npz")], "none.npz"),
        (["--gmm", "gmm2d", "--samplers", "nope"], "unknown sampler"),
        (["--gmm", "gmm2d", "--steps", "0"], "1..1000"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "inkwash", "bench", "samplers", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
