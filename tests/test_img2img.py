import numpy as np
import pytest
import torch

from conftest import GaussianDenoiser
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.sampling.generate import generate
from inkwash.sampling.img2img import InpaintDenoiser, strength_sigmas
from inkwash.sampling.samplers import SAMPLERS

SCHEDULE = NoiseSchedule()


def test_strength_selects_the_tail_of_the_schedule():
    sigmas = build_sigmas(SCHEDULE, 10)
    assert torch.equal(strength_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(strength_sigmas(sigmas, 0.3), sigmas[7:])
    assert strength_sigmas(sigmas, 0.0).tolist() == [0.0]
    with pytest.raises(ValueError):
        strength_sigmas(sigmas, 1.5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_strength_zero_returns_the_input(tiny_denoiser, sampler):
    init = torch.rand(3, 1, 16, 16) * 2 - 1
    sigmas = strength_sigmas(build_sigmas(SCHEDULE, 8), 0.0)
    result = generate(tiny_denoiser, (1, 16, 16), sigmas, sampler=sampler, num_images=3, init=init, show_progress=False)
    assert torch.equal(result.images, init)
    assert result.nfe == 0


def test_partial_strength_stays_near_the_input(tiny_denoiser):
    init = torch.rand(2, 1, 16, 16) * 2 - 1
    sigmas = build_sigmas(SCHEDULE, 20)
    low = generate(
        tiny_denoiser, (1, 16, 16), strength_sigmas(sigmas, 0.1), num_images=2, init=init, show_progress=False
    )
    high = generate(
        tiny_denoiser, (1, 16, 16), strength_sigmas(sigmas, 1.0), num_images=2, init=init, show_progress=False
    )
    assert low.nfe == 2 and high.nfe == 20
    assert (low.images - init).abs().mean() < (high.images - init).abs().mean()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpainting_keeps_the_unmasked_pixels(tiny_denoiser, sampler):
    init = torch.rand(2, 1, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0  # generate the left half
    result = generate(
        tiny_denoiser,
        (1, 16, 16),
        build_sigmas(SCHEDULE, 4),
        sampler=sampler,
        num_images=2,
        init=init,
        mask=mask,
        show_progress=False,
    )
    assert torch.equal(result.images[..., 8:], init[..., 8:])
    assert (result.images[..., :8] - init[..., :8]).abs().mean() > 0.05


def test_inpainting_with_the_exact_denoiser_conditions_on_the_known_pixels():
    """Gaussian data with strongly correlated coordinates: the generated pixel follows the kept ones."""
    strong = torch.full((4, 4), 0.95, dtype=torch.float64) + 0.05 * torch.eye(4, dtype=torch.float64)
    exact = GaussianDenoiser(torch.zeros(4, dtype=torch.float64), strong)
    init = torch.full((1, 1, 2, 2), 1.5, dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    sigmas = build_sigmas(SCHEDULE, 50, "karras")
    x = init.expand(2000, -1, -1, -1) + sigmas[0] * torch.randn(2000, 1, 2, 2, dtype=torch.float64)
    wrapped = InpaintDenoiser(exact, init, mask, (x - init) / sigmas[0])
    out = wrapped.finish(SAMPLERS["heun"].fn(wrapped, x, sigmas))
    assert torch.all(out[:, 0, 1, :] == 1.5)
    # Given three pixels at 1.5 the exact conditional mean of the fourth is 0.95 * 4.5 / 2.9 = 1.47;
    # its prior mean is 0. Replacement inpainting (the method specified: re-noise the known region
    # at each step) only approximates conditioning, since the re-noised known pixels ignore what the
    # generated ones imply; RePaint's resampling exists to close that gap. We measured 1.11 here,
    # so the generated pixel is pulled most of the way, not all of it.
    generated = out[:, 0, 0, 0].mean().item()
    assert 0.75 < generated < 1.6, generated


def test_mask_without_init_is_an_error(tiny_denoiser):
    with pytest.raises(ValueError, match="init"):
        generate(
            tiny_denoiser,
            (1, 16, 16),
            build_sigmas(SCHEDULE, 2),
            num_images=1,
            mask=torch.ones(1, 1, 16, 16),
            show_progress=False,
        )


def test_a_mask_of_another_size_is_resized_to_the_init_image_first(tmp_path, capsys):
    """A 16x16 mask drawn over a 32x16 picture marks a band at picture columns 8-16. The model sees the
    picture's centre square (columns 8-24), so the band is its left half; cropping the mask on its own
    would have put the band at columns 4-8 instead."""
    from PIL import Image

    from inkwash.pipeline import read_init, read_mask

    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "init.png")  # W=32, H=16
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 4:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    init, init_size = read_init(tmp_path / "init.png", 1, 16, show=True)
    loaded = read_mask(str(tmp_path / "mask.png"), 16, init_size, show=True)
    assert init.shape == (1, 1, 16, 16) and loaded.shape == (1, 1, 16, 16)
    assert loaded[0, 0, :, :8].eq(1).all() and loaded[0, 0, :, 8:].eq(0).all()
    assert "the 16x16 mask was resized to the init image's 32x16" in capsys.readouterr().out
