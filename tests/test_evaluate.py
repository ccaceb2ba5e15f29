import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import inkwash.evaluation.evaluate as evaluate_module
from inkwash.commands.cli import main
from inkwash.data.loading import load_digits, to_uint8
from inkwash.evaluation.evaluate import MetricSettings, class_prior_labels, periodic_eval, score_images
from inkwash.evaluation.features import get_extractor
from inkwash.evaluation.reference import load_reference, reference_features, split_indices
from inkwash.training.loop import TrainConfig, train


def noised_digits(count, std, seed=0):
    images = load_digits(16).images[:count]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(-1, 1)


def write_npz(path, images):
    np.savez(path, samples=to_uint8(images))
    return str(path)


def run_main(args, capsys):
    """inkwash.commands.cli.main in-process: (exit status, stdout, stderr)."""
    try:
        status = main(args)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_split_is_fixed_disjoint_and_stratified():
    labels = load_digits(16).labels
    train, test = split_indices(len(labels), labels)
    again_train, again_test = split_indices(len(labels), labels)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert sorted([*train, *test]) == list(range(len(labels)))
    for digit in range(10):
        in_train, in_test = int((labels[train] == digit).sum()), int((labels[test] == digit).sum())
        assert abs(in_train - in_test) <= 1


def test_reference_features_are_cached_under_a_key_that_tracks_the_data(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(generator.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{index}.png")
    extractor = get_extractor("random")
    calls = []

    def counted(images):
        calls.append(images.shape[0])
        return extractor(images)

    cache = tmp_path / "cache"
    reference = load_reference(str(folder), (1, 16, 16))
    train, test = reference_features(reference, extractor.identity, counted, cache)
    assert calls == [3, 3] and train.shape == (3, 448)
    files = list((cache / "reference").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as stored:
        assert np.array_equal(stored["test"], test)
    again = reference_features(load_reference(str(folder), (1, 16, 16)), extractor.identity, counted, cache)
    assert calls == [3, 3] and np.array_equal(again[1], test)  # read back, not recomputed
    reference_features(reference, "another-extractor", counted, cache)
    assert len(calls) == 4  # another extractor identity: another key
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "0.png")  # a changed file
    reference_features(load_reference(str(folder), (1, 16, 16)), extractor.identity, counted, cache)
    assert len(calls) == 6 and len(list((cache / "reference").glob("*.npz"))) == 3


def test_scores_order_real_then_noised_then_noise(feature_cache):
    reference = load_reference("digits", (1, 16, 16))
    settings = MetricSettings(metrics=("fid", "kid", "swd"), kid_subsets=10, kid_subset_size=300, cache=feature_cache)
    real = reference.train[:300]
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    partly = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    scores = [score_images(images, reference, settings)[0] for images in (real, partly, noise)]
    for key in ("fid", "kid", "swd"):
        assert scores[0][key] < scores[1][key] < scores[2][key], key
    # Real images score close to their own floor; pure noise is far above it.
    assert scores[0]["fid"] < 2 * scores[0]["fid_floor"] + 1e-3
    assert scores[2]["fid"] > 20 * scores[2]["fid_floor"]


def test_eval_cli_prints_the_table_and_writes_json(feature_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    samples = write_npz(tmp_path / "s.npz", noised_digits(150, 0.1))
    status, out, err = run_main(
        ["eval", "--samples", samples, "--reference", "digits", "--json", str(tmp_path / "e.json")], capsys
    )
    assert status == 0, err
    for label in ("FID", "KID", "precision", "recall", "SWD x1e3", "16px", "8px", "real-data floor"):
        assert label in out
    report = json.loads((tmp_path / "e.json").read_text())
    expected = {"fid", "kid", "kid_std", "precision", "recall", "swd", "swd_16px", "swd_8px"}
    assert expected | {key + "_floor" for key in expected} == set(report["scores"])
    assert report["counts"] == {"samples": 150, "reference": 896, "floor": 150}
    assert report["features"] == "digits" and all(math.isfinite(v) for v in report["scores"].values())
    assert f"{report['scores']['fid']:.3f}" in out


GOOD = ["--samples", "good.npz", "--reference", "digits"]


@pytest.mark.parametrize(
    ("args", "status", "fragment"),
    [
        ([*GOOD, "--metrics", "fid,bogus"], 2, "unknown metric"),
        ([*GOOD, "--num-samples", "0"], 2, "positive integer"),
        ([*GOOD, "--features", "vgg"], 2, "invalid choice"),
        ([*GOOD, "--checkpoint", "run"], 2, "not allowed with"),
        (["--reference", "digits"], 2, "one of the arguments --samples --checkpoint is required"),
        ([*GOOD, "--metrics", "nll"], 1, "needs a model"),
        ([*GOOD, "--features", "inception"], 1, "Inception weights not found"),
        ([*GOOD, "--features", "inception", "--inception-weights", "no.safetensors"], 1, "not found: no.safetensors"),
        (["--samples", "good.npz", "--reference", "nowhere"], 1, "--reference must be"),
        (["--samples", "good.npz", "--reference", "ref8.npz"], 1, "reference images"),
        (["--samples", "missing.npz", "--reference", "digits"], 1, "not found"),
        (["--samples", "floats.npz", "--reference", "digits"], 1, "must be uint8"),
        (["--checkpoint", "no_run", "--reference", "digits"], 1, "checkpoint directory not found"),
        ([*GOOD, "--guidance-scale", "2"], 1, "--guidance-scale applies to --checkpoint"),
        ([*GOOD, "--guidance-scale", "-1"], 2, "--guidance-scale"),
        ([*GOOD, "--draws", "2"], 1, "--draws applies to --checkpoint"),
        ([*GOOD, "--draws", "0"], 2, "--draws"),
    ],
)
def test_eval_bad_options_are_one_line_errors(args, status, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("INKWASH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    write_npz("good.npz", noised_digits(10, 0.1))
    np.savez("floats.npz", samples=np.zeros((4, 16, 16, 1), np.float32))
    np.savez("ref8.npz", samples=np.zeros((10, 8, 8, 1), np.uint8))
    seen, _, err = run_main(["eval", *args], capsys)
    assert seen == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_eval_of_a_checkpoint_includes_bits_per_dim(feature_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    run = tmp_path / "run"
    config = TrainConfig(data="digits", out=str(run), preset="tiny", steps=2, batch_size=4, checkpoint_every=2)
    train(config, show_progress=False)
    args = ["--reference", "digits", "--metrics", "fid,nll", "--num-samples", "8", "--steps", "2", "--nll-terms", "3"]
    status, out, err = run_main(["eval", "--checkpoint", str(run), *args, "--json", str(tmp_path / "e.json")], capsys)
    assert status == 0, err
    assert "NLL bits/dim" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["counts"]["nll_images"] == 8 and report["counts"]["samples"] == 8
    # An untrained network is far worse than the 8 bits/dim of uniform noise on 256 levels.
    assert report["scores"]["nll_bpd"] > 8


def test_eval_of_a_checkpoint_in_bf16_samples_in_bf16_and_keeps_bits_per_dim_exact(
    feature_cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    run = tmp_path / "run"
    train(TrainConfig(data="digits", out=str(run), preset="tiny", steps=2, batch_size=4), show_progress=False)
    args = ["--reference", "digits", "--metrics", "fid,nll", "--num-samples", "8", "--steps", "2", "--nll-terms", "3"]
    reports = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        status, _, err = run_main(
            ["eval", "--checkpoint", str(run), *args, "--device", "cpu", "--precision", precision, "--json", str(out)],
            capsys,
        )
        assert status == 0, err
        reports[precision] = json.loads(out.read_text())
    assert reports["bf16"]["settings"]["precision"] == "bf16" and reports["bf16"]["settings"]["device"] == "cpu"
    assert reports["bf16"]["scores"]["fid"] != reports["fp32"]["scores"]["fid"]  # the samples were drawn in bf16
    assert reports["bf16"]["scores"]["nll_bpd"] == reports["fp32"]["scores"]["nll_bpd"]  # the bound is not


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_eval_on_a_missing_gpu_is_a_one_line_error(tmp_path, capsys):
    status, _, err = run_main(["eval", "--checkpoint", "no_run", "--reference", "digits", "--device", "cuda"], capsys)
    assert status == 1 and "sees no GPU" in err and len(err.strip().splitlines()) == 1


def test_class_prior_labels_follow_the_training_frequencies():
    labels = class_prior_labels(3, [700, 200, 100], 20_000, seed=5)
    assert labels.shape == (20_000,) and labels.dtype == torch.long
    assert torch.bincount(labels, minlength=3).tolist() == [14_000, 4_000, 2_000]  # stratified: exact proportions
    assert labels[:30].tolist() != sorted(labels[:30].tolist())  # in a shuffled order, not class by class
    assert torch.equal(labels, class_prior_labels(3, [700, 200, 100], 20_000, seed=5))  # the seed fixes them
    assert not torch.equal(labels, class_prior_labels(3, [700, 200, 100], 20_000, seed=6))
    assert torch.bincount(class_prior_labels(4, None, 20_000), minlength=4).tolist() == [5_000] * 4  # unknown counts
    assert torch.bincount(class_prior_labels(3, [0, 5, 0], 50), minlength=3).tolist() == [0, 50, 0]
    for broken in ([5, -1, 2], [0, 0, 0], [1, 2]):  # a hand-edited config: fall back to uniform
        assert set(class_prior_labels(3, broken, 300).tolist()) == {0, 1, 2}


def test_class_prior_labels_round_by_the_largest_remainder():
    # quotas 10/3 each: floors 3, 3, 3 and one image left over, which goes to the lowest index on a tie
    assert torch.bincount(class_prior_labels(3, [1, 1, 1], 10), minlength=3).tolist() == [4, 3, 3]
    # quotas 2.67 and 1.33: the larger remainder gets the leftover image
    assert torch.bincount(class_prior_labels(2, [2, 1], 4), minlength=2).tolist() == [3, 1]
    # quotas 0.5, 1.5, 1.0 of 3: 0, 1, 1 and the tie of remainders 0.5 goes to class 0
    assert torch.bincount(class_prior_labels(3, [1, 3, 2], 3), minlength=3).tolist() == [1, 1, 1]
    for n in (0, 1, 7, 999):
        counts = [90, 91, 89, 92, 91, 90, 90, 89, 85, 94]
        labels = class_prior_labels(10, counts, n, seed=n)
        assert labels.shape == (n,)
        expected = torch.tensor(counts, dtype=torch.float64) / sum(counts) * n
        assert (torch.bincount(labels, minlength=10).double() - expected).abs().max() < 1  # within one image
    with pytest.raises(ValueError, match="num_samples"):
        class_prior_labels(3, None, -1)


def test_eval_of_a_class_conditional_checkpoint_draws_labels_from_its_class_counts(
    feature_cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    run = tmp_path / "run"
    config = TrainConfig(
        data="digits", out=str(run), preset="tiny", steps=2, batch_size=4, checkpoint_every=2, class_cond=True
    )
    train(config, show_progress=False)
    saved = json.loads((run / "checkpoints" / "step_00000002" / "config.json").read_text())
    train_labels = load_digits(16, "train").labels
    assert saved["data"]["class_counts"] == torch.bincount(train_labels, minlength=10).tolist()
    seen = {}
    real_generate = evaluate_module.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", spy)
    args = ["--reference", "digits", "--metrics", "fid", "--num-samples", "12", "--steps", "2", "--seed", "3"]
    status, out, err = run_main(["eval", "--checkpoint", str(run), *args, "--guidance-scale", "2"], capsys)
    assert status == 0, err
    assert "FID" in out
    expected = class_prior_labels(10, saved["data"]["class_counts"], 12, seed=3)
    assert torch.equal(seen["labels"], expected)
    assert seen["guidance_scale"] == 2.0 and seen["null_label"] == 10  # the model's "no class" index


def test_eval_draws_are_single_draws_on_consecutive_seeds_and_their_mean(feature_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    run = tmp_path / "run"
    config = TrainConfig(data="digits", out=str(run), preset="tiny", steps=2, batch_size=4, class_cond=True)
    train(config, show_progress=False)
    args = ["--checkpoint", str(run), "--reference", "digits", "--metrics", "fid,pr", "--num-samples", "12"]
    args += ["--steps", "2", "--sampler", "ddpm"]
    singles = []
    for seed in (5, 6, 7):
        status, _, err = run_main(
            ["eval", *args, "--seed", str(seed), "--json", str(tmp_path / f"{seed}.json")], capsys
        )
        assert status == 0, err
        singles.append(json.loads((tmp_path / f"{seed}.json").read_text())["scores"])
    assert singles[0]["fid"] != singles[1]["fid"]  # the seed draws other labels and noise
    status, out, err = run_main(
        ["eval", *args, "--seed", "5", "--draws", "3", "--json", str(tmp_path / "d.json")], capsys
    )
    assert status == 0, err
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["draws"] == singles  # draw i is exactly the single draw with seed 5 + i
    assert report["counts"]["draws"] == 3 and report["counts"]["samples"] == 12
    for key in ("fid", "precision", "recall", "fid_floor"):
        assert report["scores"][key] == pytest.approx(sum(d[key] for d in singles) / 3, rel=1e-12)
    fids = [d["fid"] for d in singles]
    assert report["scores"]["fid_draws_sd"] == pytest.approx(float(np.std(fids, ddof=1)), rel=1e-9)
    assert "fid_floor_draws_sd" not in report["scores"]
    assert "3 draws of 12 samples" in out
    assert f"{report['scores']['fid']:.3f} (sd {report['scores']['fid_draws_sd']:.3f} over 3 draws)" in out


def test_eval_rejects_guidance_for_an_unconditional_checkpoint(feature_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    run = tmp_path / "run"
    train(TrainConfig(data="digits", out=str(run), preset="tiny", steps=1, batch_size=4), show_progress=False)
    args = ["--reference", "digits", "--num-samples", "4", "--steps", "2", "--guidance-scale", "3"]
    status, _, err = run_main(["eval", "--checkpoint", str(run), *args], capsys)
    assert status == 1 and "needs a class-conditional checkpoint" in err and "Traceback" not in err


def test_periodic_eval_returns_flat_scores_and_restores_the_mode(tiny_denoiser, feature_cache):
    tiny_denoiser.train()
    scores = periodic_eval(
        tiny_denoiser, (1, 16, 16), "digits", ("fid", "kid", "swd", "nll"), 12, steps=2, cache=str(feature_cache)
    )
    levels = {"swd", "swd_16px", "swd_8px"}
    expected = {"fid", "fid_floor", "kid", "kid_std", "kid_floor", "kid_std_floor", "nll_bpd"}
    assert set(scores) == expected | levels | {key + "_floor" for key in levels}
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    assert tiny_denoiser.training


def test_eval_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "inkwash eval --samples" in out and "real-data floor" in out
