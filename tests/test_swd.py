import pytest
import torch

from inkwash.data.loading import load_digits
from inkwash.evaluation.reference import split_indices
from inkwash.evaluation.swd import _upsample, laplacian_pyramid, patch_descriptors, sliced_wasserstein_pyramid


@pytest.fixture(scope="module")
def digit_halves():
    data = load_digits(16)
    train, test = split_indices(len(data), data.labels)
    return data.images[train][:300], data.images[test][:300]


@pytest.mark.parametrize(("side", "levels"), [(16, [16, 8]), (32, [32, 16, 8]), (12, [12])])
def test_pyramid_levels_and_exact_reconstruction(side, levels):
    images = torch.rand(3, 2, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pyramid = laplacian_pyramid(images)
    assert [level.shape[-1] for level in pyramid] == levels
    # A Laplacian pyramid is invertible: expand the coarsest level and add the bands back.
    rebuilt = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        rebuilt = band + _upsample(rebuilt, band.shape[-2:])
    assert torch.allclose(rebuilt, images.double(), atol=1e-12)


def test_band_levels_of_a_constant_image_are_zero():
    pyramid = laplacian_pyramid(torch.full((2, 1, 16, 16), 0.3))
    assert pyramid[0].abs().max() < 1e-12  # the band-pass level holds no detail
    assert torch.allclose(pyramid[-1], torch.full_like(pyramid[-1], 0.3))


def test_patch_descriptors_are_patches_of_the_level():
    level = torch.arange(2 * 16 * 16, dtype=torch.float64).reshape(2, 1, 16, 16)
    patches = patch_descriptors(level, 5, torch.Generator().manual_seed(1))
    assert patches.shape == (10, 1, 7, 7)
    for index, patch in enumerate(patches):
        image = level[index // 5, 0]
        top, left = divmod(int(patch[0, 0, 0]) % 256, 16)
        assert torch.equal(patch[0], image[top : top + 7, left : left + 7])


def test_swd_orders_real_noised_and_noise(digit_halves):
    train, test = digit_halves
    generator = torch.Generator().manual_seed(2)
    noised = (train + 0.4 * torch.randn(train.shape, generator=generator)).clamp(-1, 1)
    noise = torch.rand(train.shape, generator=generator) * 2 - 1
    real = sliced_wasserstein_pyramid(train, test)
    partly = sliced_wasserstein_pyramid(noised, test)
    pure = sliced_wasserstein_pyramid(noise, test)
    assert set(real) == {"swd", "swd_16px", "swd_8px"}
    assert real["swd"] == pytest.approx((real["swd_16px"] + real["swd_8px"]) / 2)
    assert real["swd"] < partly["swd"] < pure["swd"]
    assert real["swd_16px"] < partly["swd_16px"] < pure["swd_16px"]


def test_swd_ignores_brightness_and_contrast(digit_halves):
    # Karras et al. normalise each set's descriptors per channel, so an affine change of one set's
    # intensities (the pyramid is linear) leaves every level's distance unchanged.
    train, test = digit_halves
    plain = sliced_wasserstein_pyramid(train, test, seed=3)
    scaled = sliced_wasserstein_pyramid(0.5 * train + 0.2, test, seed=3)
    for key, value in plain.items():
        assert scaled[key] == pytest.approx(value, rel=1e-6)  # float32 inputs


def test_swd_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="shapes differ"):
        sliced_wasserstein_pyramid(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 7x7"):
        sliced_wasserstein_pyramid(torch.zeros(2, 1, 6, 6), torch.zeros(2, 1, 6, 6))
