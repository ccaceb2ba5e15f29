import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_tiny_unet, save_random_run
from inkwash.commands.cli import main
from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.sampling.generate import CountingDenoiser, generate
from inkwash.sampling.guidance import GuidedDenoiser

NAMES = ["cat", "dog", "owl"]
NULL = len(NAMES)


@pytest.fixture(scope="module")
def cond_denoiser():
    return ModelDenoiser(random_tiny_unet(len(NAMES)), NoiseSchedule())


def _inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 1, 16, 16, generator=generator) * 3.0
    sigma = torch.full((batch,), 2.5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])[:batch]
    return x, sigma, labels


def test_scale_one_is_the_conditional_denoiser_in_one_evaluation(cond_denoiser):
    x, sigma, labels = _inputs()
    counter = CountingDenoiser(cond_denoiser)
    with torch.no_grad():
        guided = GuidedDenoiser(counter, 1.0, NULL)(x, sigma, labels)
        conditional = cond_denoiser(x, sigma, labels)
        unconditional = cond_denoiser(x, sigma, None)
    assert (conditional - unconditional).abs().max() > 1e-3  # the label matters
    assert torch.equal(guided, conditional)
    assert (counter.calls, counter.rows) == (1, len(x))


def test_scale_zero_is_the_unconditional_denoiser(cond_denoiser):
    x, sigma, labels = _inputs()
    counter = CountingDenoiser(cond_denoiser)
    with torch.no_grad():
        guided = GuidedDenoiser(counter, 0.0, NULL)(x, sigma, labels)
        unconditional = cond_denoiser(x, sigma, None)
        explicit_null = cond_denoiser(x, sigma, torch.full_like(labels, NULL))
    assert torch.equal(unconditional, explicit_null)
    assert torch.equal(guided, unconditional)
    assert (counter.calls, counter.rows) == (1, len(x))


def test_batched_guidance_equals_the_two_call_formula(cond_denoiser):
    x, sigma, labels = _inputs()
    counter = CountingDenoiser(cond_denoiser)
    scale = 3.0
    with torch.no_grad():
        guided = GuidedDenoiser(counter, scale, NULL)(x, sigma, labels)
        conditional = cond_denoiser(x, sigma, labels)
        unconditional = cond_denoiser(x, sigma, None)
        # A scalar sigma is broadcast over the doubled batch too.
        scalar_sigma = GuidedDenoiser(cond_denoiser, scale, NULL)(x, 2.5, labels)
    expected = unconditional + scale * (conditional - unconditional)
    assert (guided - conditional).abs().max() > 1e-3
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scalar_sigma, expected, atol=1e-5, rtol=0)
    assert (counter.calls, counter.rows) == (1, 2 * len(x))  # one network call, two evaluations per image


def test_guidance_without_labels_is_unconditional(cond_denoiser):
    x, sigma, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(GuidedDenoiser(cond_denoiser, 3.0, NULL)(x, sigma, None), cond_denoiser(x, sigma, None))
    with pytest.raises(ValueError, match=">= 0"):
        GuidedDenoiser(cond_denoiser, -0.5, NULL)


def _generate(denoiser, batch_size, labels, **kwargs):
    return generate(
        denoiser,
        (1, 16, 16),
        build_sigmas(NoiseSchedule(), 4),
        sampler="ddim",
        num_images=5,
        batch_size=batch_size,
        seed=11,
        show_progress=False,
        labels=labels,
        null_label=NULL,
        **kwargs,
    )


def test_guided_images_depend_only_on_seed_and_label(cond_denoiser):
    labels = torch.tensor([2, 0, 1, 2, 0])
    runs = [_generate(cond_denoiser, bs, labels, guidance_scale=3.0) for bs in (1, 2, 5)]
    for other in runs[1:]:
        assert (runs[0].images - other.images).abs().max().item() <= 2 / 255
    assert runs[0].images.std() > 0.01
    # Image 3 alone, as image 0 of a run seeded 11 + 3, is the same image.
    alone = generate(
        cond_denoiser,
        (1, 16, 16),
        build_sigmas(NoiseSchedule(), 4),
        num_images=1,
        seed=14,
        show_progress=False,
        labels=labels[3:4],
        guidance_scale=3.0,
        null_label=NULL,
    )
    assert (alone.images[0] - runs[0].images[3]).abs().max().item() <= 2 / 255
    relabelled = _generate(cond_denoiser, 5, torch.tensor([0, 0, 1, 2, 0]), guidance_scale=3.0)
    assert (relabelled.images[0] - runs[0].images[0]).abs().max() > 0.05  # image 0's label changed
    assert (relabelled.images[1:] - runs[0].images[1:]).abs().max() <= 2 / 255


def test_guided_nfe_counts_both_evaluations(cond_denoiser):
    labels = torch.tensor([1])
    assert _generate(cond_denoiser, 5, labels).nfe == 4
    assert _generate(cond_denoiser, 5, labels, guidance_scale=0.0).nfe == 4
    assert _generate(cond_denoiser, 5, labels, guidance_scale=3.0).nfe == 8


def test_clipping_applies_to_the_guided_estimate(cond_denoiser):
    labels = torch.tensor([0, 1, 2, 0, 1])
    clipped = _generate(cond_denoiser, 5, labels, guidance_scale=30.0, clip_denoised=True, record=[0, 1, 2, 3])
    raw = _generate(cond_denoiser, 5, labels, guidance_scale=30.0, record=[0, 1, 2, 3])
    assert max(d.abs().max().item() for _, _, d in raw.trajectory) > 1.0
    assert max(d.abs().max().item() for _, _, d in clipped.trajectory) <= 1.0


def test_generate_rejects_guidance_without_labels_or_null(cond_denoiser):
    sigmas = build_sigmas(NoiseSchedule(), 2)
    with pytest.raises(ValueError, match="needs labels"):
        generate(cond_denoiser, (1, 16, 16), sigmas, num_images=1, guidance_scale=2.0, null_label=NULL)
    with pytest.raises(ValueError, match="null_label"):
        generate(cond_denoiser, (1, 16, 16), sigmas, num_images=1, guidance_scale=2.0, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match=">= 0"):
        generate(cond_denoiser, (1, 16, 16), sigmas, num_images=1, guidance_scale=-1.0)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    return save_random_run(tmp_path_factory.mktemp("cond"), NAMES)


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory):
    return save_random_run(tmp_path_factory.mktemp("uncond"))


def _sample(run, out, *extra):
    args = ["sample", "--checkpoint", str(run), "--out", str(out), "--steps", "3", "--num-images", "3"]
    return main([*args, *extra])


def test_cli_class_and_guidance(cond_run, tmp_path, capsys):
    assert _sample(cond_run, tmp_path / "dog", "--class", "dog", "--guidance-scale", "3", "--batch-size", "2") == 0
    assert "6 model evaluations per image" in capsys.readouterr().out
    summary = json.loads((tmp_path / "dog" / "sampling.json").read_text())
    assert summary["labels"] == [1, 1, 1]
    assert summary["guidance_scale"] == 3.0 and summary["nfe"] == 6
    assert summary["class_names"] == NAMES

    # An index names the same class; the same seeds give the same pixels.
    assert _sample(cond_run, tmp_path / "one", "--class", "1", "--guidance-scale", "3") == 0
    assert "6 model evaluations per image" in capsys.readouterr().out
    dog = np.load(tmp_path / "dog" / "samples.npz")["samples"].astype(int)
    one = np.load(tmp_path / "one" / "samples.npz")["samples"].astype(int)
    assert np.abs(dog - one).max() <= 1

    assert _sample(cond_run, tmp_path / "plain", "--class", "owl") == 0
    assert "3 model evaluations per image" in capsys.readouterr().out
    owl = np.load(tmp_path / "plain" / "samples.npz")["samples"].astype(int)
    assert np.abs(owl - dog).max() > 1

    assert _sample(cond_run, tmp_path / "all", "--class", "all") == 0
    assert json.loads((tmp_path / "all" / "sampling.json").read_text())["labels"] == [0, 1, 2]


def test_cli_grid_by_class(cond_run, tmp_path, capsys):
    out = tmp_path / "grid"
    assert _sample(cond_run, out, "--grid-by-class", "--per-class", "2", "--guidance-scale", "2") == 0
    assert "wrote 6 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(6)]
    summary = json.loads((out / "sampling.json").read_text())
    assert summary["labels"] == [0, 0, 1, 1, 2, 2] and summary["num_images"] == 6
    # Three labelled rows of two 64-pixel tiles: wider than the unlabelled two-column grid.
    grid = Image.open(out / "grid.png")
    assert grid.height == 3 * (64 + 2) + 2
    assert grid.width > 2 * (64 + 2) + 2


@pytest.mark.parametrize(
    ("conditional", "extra", "fragment"),
    [
        (False, ["--class", "3"], "--class needs a class-conditional checkpoint"),
        (False, ["--grid-by-class"], "--grid-by-class needs a class-conditional checkpoint"),
        (False, ["--guidance-scale", "2"], "--guidance-scale needs a class-conditional checkpoint"),
        (True, ["--class", "emu"], "unknown class 'emu'; choose from cat, dog, owl"),
        (True, ["--class", "3"], "--class index 3 is out of range 0..2"),
        (True, ["--class", "-1"], "--class index -1 is out of range 0..2"),
        (True, ["--guidance-scale", "2"], "--guidance-scale needs --class, --negative-class or --grid-by-class"),
        (True, ["--grid-by-class", "--class", "dog"], "leave out --class"),
        (True, ["--per-class", "2"], "--per-class needs --grid-by-class"),
    ],
)
def test_cli_class_errors_are_one_line(cond_run, uncond_run, tmp_path, capsys, conditional, extra, fragment):
    assert _sample(cond_run if conditional else uncond_run, tmp_path / "o", *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize("value", ["-1", "nan", "x"])
def test_cli_negative_guidance_scale_is_a_usage_error(cond_run, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        _sample(cond_run, tmp_path / "o", "--class", "0", "--guidance-scale", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance-scale" in err[0] and "expected a number >= 0" in err[0]


def test_guided_inpainting_keeps_the_known_pixels(cond_denoiser):
    init = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0
    result = _generate(cond_denoiser, 2, torch.tensor([0, 1, 2, 0, 1]), guidance_scale=3.0, init=init, mask=mask)
    kept = (mask == 0).expand_as(result.images)
    assert torch.equal(result.images[kept], init.expand_as(result.images)[kept])
    assert (result.images - init)[~kept].abs().max() > 0.05
    assert result.nfe == 8
