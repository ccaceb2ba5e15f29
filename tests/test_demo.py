import json
from pathlib import Path

from inkwash.commands.cli import DemoOptions
from inkwash.commands.demo import DEMO_DDPM_STEPS, DEMO_EVAL_DRAWS, DEMO_GUIDANCE_SCALE, run_demo


def test_demo_writes_every_picture_and_scores_its_samples(tmp_path, feature_cache, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    summary = run_demo(tmp_path, minutes=0.05, preset="tiny", num_images=4, full_ddpm_images=2, eval_samples=12)
    for path in summary["pictures"].values():
        assert Path(path).is_file(), path
    saved = json.loads((tmp_path / "summary.json").read_text())
    # guidance 0.9 (two network evaluations per step) on the scored DDPM and the DDIM runs; the 1000-step one is plain
    assert saved["nfe"] == {f"ddpm_{DEMO_DDPM_STEPS}": 2 * DEMO_DDPM_STEPS, "ddim_50": 100, "ddpm_1000": 1000}
    assert saved["train_steps"] >= 1
    assert (tmp_path / "samples" / "samples.npz").is_file()
    # The demo trains class-conditionally and draws one grid row per digit (num_images // 10 each, at least 1).
    by_class = json.loads((tmp_path / "samples" / "sampling.json").read_text())
    assert by_class["labels"] == list(range(10))
    assert by_class["guidance_scale"] == DEMO_GUIDANCE_SCALE == 0.9
    full = json.loads((tmp_path / "samples_ddpm1000" / "sampling.json").read_text())
    assert full["labels"] == [0, 1]  # image i gets digit i mod 10
    assert full["guidance_scale"] == 1.0
    # Step 6 scores DDPM samples as benchmarks/quality.py --ddpm-steps does, beside the real-data floor.
    report = json.loads((tmp_path / "eval.json").read_text())
    # The score is the mean of three draws of 12 samples on seeds 0, 1 and 2.
    assert DemoOptions.eval_draws == DEMO_EVAL_DRAWS == 3
    assert report["counts"]["samples"] == 12 and report["counts"]["draws"] == 3 and len(report["draws"]) == 3
    assert report["scores"]["fid"] == sum(d["fid"] for d in report["draws"]) / 3
    assert report["settings"]["sampler"] == "ddpm" and report["settings"]["steps"] == DEMO_DDPM_STEPS == 50
    assert report["settings"]["guidance_scale"] == DEMO_GUIDANCE_SCALE
    assert saved["eval"]["fid"] == round(report["scores"]["fid"], 4)
    assert saved["eval"]["fid_floor"] > 0 and "recall" in saved["eval"] and "kid" in saved["eval"]
    out = capsys.readouterr().out
    assert "6/6 scoring 3 draws of 12 DDPM-50 samples" in out and "5/6 sampling 2 digits with DDPM" in out
    fid, floor = report["scores"]["fid"], report["scores"]["fid_floor"]
    # The summary line prints the same unrounded figures as the table above it.
    spread = report["scores"]["fid_draws_sd"]
    line = f"FID {fid:.3f} over 3 draws of 12 DDPM-50 samples (mean; sd {spread:.3f}): {fid / floor:.2f}x the real-data"
    assert f"{line} floor {floor:.3f}" in out


def test_demo_without_scoring(tmp_path, capsys):
    summary = run_demo(tmp_path, minutes=0.02, preset="tiny", num_images=1, full_ddpm_images=1, eval_samples=0)
    assert summary["eval"] is None and not (tmp_path / "eval.json").exists()
    out = capsys.readouterr().out
    assert "5/5 sampling 1 digit with DDPM" in out and "FID" not in out
    assert not [line for line in out.splitlines() if line.startswith("6/")]  # no sixth step (paths may hold "6/")


def test_a_second_demo_in_the_same_folder_samples_its_own_model(tmp_path, capsys, monkeypatch):
    """The second demo trains fewer steps than the first; everything it reports is of its own model."""
    import dataclasses

    import inkwash.commands.demo as demo

    budgets = iter([30, 12])  # step counts instead of wall-clock budgets, so a busy machine cannot reorder them
    original = demo.train

    def fixed_steps(config, **kwargs):
        return original(dataclasses.replace(config, steps=next(budgets), time_limit=None), **kwargs)

    monkeypatch.setattr(demo, "train", fixed_steps)
    first = run_demo(tmp_path, minutes=0.05, preset="tiny", num_images=1, full_ddpm_images=1, eval_samples=0)
    second = run_demo(tmp_path, minutes=0.05, preset="tiny", num_images=1, full_ddpm_images=1, eval_samples=0)
    assert (first["train_steps"], second["train_steps"]) == (30, 12)  # where pruning used to keep the old run
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == [f"step_{second['train_steps']:08d}"]
    assert second["checkpoint"].endswith(kept[0])
    for folder in ("samples", "samples_ddim", "samples_ddpm1000"):
        sampled = json.loads((tmp_path / folder / "sampling.json").read_text())
        assert sampled["checkpoint_step"] == second["train_steps"], folder
    assert json.loads((tmp_path / "summary.json").read_text())["train_steps"] == second["train_steps"]
    assert "removed the previous run" in capsys.readouterr().out
