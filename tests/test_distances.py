import numpy as np
import pytest
import torch

from inkwash.evaluation.distances import sliced_wasserstein


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_self_distance_is_zero():
    a = torch.randn(500, 6, generator=_gen(0))
    assert sliced_wasserstein(a, a, generator=_gen(1)) == 0.0
    # order does not matter: a permuted copy is the same point cloud
    permuted = a[torch.randperm(500, generator=_gen(2))]
    assert sliced_wasserstein(a, permuted, generator=_gen(1)) == pytest.approx(0.0, abs=1e-12)


def test_symmetric():
    a = torch.randn(400, 5, generator=_gen(3), dtype=torch.float64)
    b = torch.randn(400, 5, generator=_gen(4), dtype=torch.float64) * 1.5 + 0.3
    ab = sliced_wasserstein(a, b, generator=_gen(5))
    ba = sliced_wasserstein(b, a, generator=_gen(5))
    assert ab > 0.1
    assert ab == pytest.approx(ba, rel=1e-12)


def test_shifted_gaussians_closed_form():
    # For N(0, I) vs N(m, I), each projection gives W2^2 = (theta . m)^2, and
    # E_theta[(theta . m)^2] = |m|^2 / D for theta uniform on the sphere.
    dim, n = 8, 20_000
    m = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, -0.5, 1.0, 1.5], dtype=torch.float64)
    a = torch.randn(n, dim, generator=_gen(6), dtype=torch.float64)
    b = torch.randn(n, dim, generator=_gen(7), dtype=torch.float64) + m
    sw2 = sliced_wasserstein(a, b, num_projections=1024, generator=_gen(8)) ** 2
    expected = float(m.square().sum()) / dim  # 1.125
    # Monte-Carlo sd over 1024 directions is ~3.5% of the expectation here; sample noise is ~1e-3
    assert sw2 == pytest.approx(expected, rel=0.12)
    # far from a trivial pass: unshifted clouds give ~0
    assert sliced_wasserstein(a, b - m, num_projections=64, generator=_gen(8)) ** 2 < 0.01


def test_shift_of_the_same_cloud_in_1d_is_exact():
    a = torch.randn(300, 1, generator=_gen(9), dtype=torch.float64)
    assert sliced_wasserstein(a, a + 0.75, num_projections=3, generator=_gen(10)) == pytest.approx(0.75, rel=1e-12)
    # 1-D sorted matching by hand: [0, 1, 2] vs [3, 1, 2] -> sorted [0, 1, 2] vs [1, 2, 3]
    assert sliced_wasserstein(np.array([[0.0], [1.0], [2.0]]), np.array([[3.0], [1.0], [2.0]])) == pytest.approx(1.0)


def test_reproducible_under_fixed_generator():
    a = torch.randn(300, 4, generator=_gen(11))
    b = torch.randn(300, 4, generator=_gen(12)) + 0.2
    first = sliced_wasserstein(a, b, num_projections=16, generator=_gen(13))
    second = sliced_wasserstein(a, b, num_projections=16, generator=_gen(13))
    other = sliced_wasserstein(a, b, num_projections=16, generator=_gen(14))
    assert first == second
    assert first != other


def test_unequal_sample_counts():
    a = torch.randn(250, 3, generator=_gen(15), dtype=torch.float64)
    # the same empirical distribution with every point twice: distance 0
    assert sliced_wasserstein(a, torch.cat([a, a]), generator=_gen(16)) == pytest.approx(0.0, abs=1e-12)
    # 1-D N(0, 1) vs N(0, 2^2): W2 = |1 - 2| = 1
    x = torch.randn(20_000, 1, generator=_gen(17), dtype=torch.float64)
    y = 2 * torch.randn(30_000, 1, generator=_gen(18), dtype=torch.float64)
    assert sliced_wasserstein(x, y, num_projections=2, generator=_gen(19)) == pytest.approx(1.0, abs=0.03)
    assert sliced_wasserstein(y, x, num_projections=2, generator=_gen(19)) == pytest.approx(1.0, abs=0.03)


def test_numpy_and_image_shaped_inputs():
    a = np.random.default_rng(20).normal(size=(64, 2, 2, 2))
    b = np.random.default_rng(21).normal(size=(64, 8)) + 1
    value = sliced_wasserstein(a, b, generator=_gen(22))
    same = sliced_wasserstein(torch.from_numpy(a).reshape(64, 8), torch.from_numpy(b), generator=_gen(22))
    assert value == same and value > 0.1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="no points"):
        sliced_wasserstein(torch.zeros(0, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="shape"):
        sliced_wasserstein(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), num_projections=0)
