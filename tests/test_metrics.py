import numpy as np
import pytest
from scipy import linalg

from inkwash.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)


def random_covariance(rng, dim, scale=1.0):
    a = rng.normal(size=(dim, dim)) * scale
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_matches_the_closed_form_for_diagonal_covariances():
    # Commuting covariances: W2^2 = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_the_closed_form_for_a_scaled_covariance():
    # S2 = c^2 S1: (S1 S2)^1/2 = c S1, so W2^2 = |m1 - m2|^2 + (1 - c)^2 tr(S1), for a dense S1.
    rng = np.random.default_rng(1)
    cov = random_covariance(rng, 20)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    c = 1.7
    expected = ((m1 - m2) ** 2).sum() + (1 - c) ** 2 * np.trace(cov)
    assert frechet_distance(m1, cov, m2, c**2 * cov) == pytest.approx(expected, rel=1e-10)


def test_frechet_agrees_with_scipy_sqrtm_on_dense_covariances():
    rng = np.random.default_rng(2)
    cov1, cov2 = random_covariance(rng, 15), random_covariance(rng, 15, 0.5)
    m1, m2 = rng.normal(size=15), rng.normal(size=15)
    root = linalg.sqrtm(cov1 @ cov2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root)
    assert frechet_distance(m1, cov1, m2, cov2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m1, cov1, m2, cov2) == pytest.approx(frechet_distance(m2, cov2, m1, cov1), rel=1e-9)


def test_frechet_is_zero_and_finite_for_rank_deficient_covariances():
    # Fewer samples than features: a singular covariance, where sqrtm of S1 S2 can turn complex.
    rng = np.random.default_rng(3)
    mean, cov = feature_statistics(rng.normal(size=(5, 12)))
    distance = frechet_distance(mean, cov, mean, cov)
    assert np.isfinite(distance) and 0 <= distance < 1e-9
    other_mean, other_cov = feature_statistics(rng.normal(size=(5, 12)))
    assert frechet_distance(mean, cov, other_mean, other_cov) > 1.0


def test_frechet_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40_000, 3))
    y = rng.normal(size=(40_000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    expected = 1.0 + (1 - 2) ** 2 + (1 - 0.5) ** 2
    assert frechet_distance_features(x, y) == pytest.approx(expected, rel=0.03)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_is_unbiased_on_sets_from_one_distribution():
    # 400 trials of two sets of 30 points drawn from one distribution. The unbiased MMD^2 has mean 0,
    # so the trial mean must lie within 4 standard errors of 0. The biased (V-statistic) estimate,
    # which keeps k(x_i, x_i), must land far outside that band: the check can tell the two apart.
    rng = np.random.default_rng(5)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.gamma(2.0, size=(30, 8)), rng.gamma(2.0, size=(30, 8))
        unbiased.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((m @ n.T / 8 + 1) ** 3 for m, n in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    tolerance = 4 * np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < tolerance
    assert np.mean(biased) > 5 * tolerance


def test_kid_subsets_and_separation():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(150, 16))
    # One subset as large as both sets is the plain estimate on all of them (order does not matter).
    same, std = kernel_inception_distance(x[:150], y, num_subsets=1, subset_size=1000)
    assert same == pytest.approx(mmd2_unbiased(x[:150], y), abs=1e-10)
    shifted, shifted_std = kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=100)
    null, null_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    assert shifted > 10 * max(abs(null), null_std) and shifted_std > 0
    assert std == 0.0  # one subset


def test_precision_and_recall_of_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(100, 5))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_halves_when_half_the_fakes_are_off_the_manifold():
    # Fakes: an exact copy of the reals plus as many points in a far-away cluster. The copies are
    # inside the real manifold, the far ones are not (precision 1/2); every real point lies in the
    # ball around its own copy (recall 1).
    rng = np.random.default_rng(8)
    real = rng.normal(size=(80, 4))
    fake = np.concatenate([real, 50.0 + rng.normal(size=(80, 4))])
    assert precision_recall(real, fake) == (0.5, 1.0)


def test_recall_counts_the_covered_part_of_a_dropped_mode():
    # Reals at 0, 1, ..., 99 on a line; fakes only at 0 .. 49. Every fake is on the real manifold
    # (precision 1). The fake balls reach their 3rd neighbour: radius 3 at the end point 49, so reals
    # 0 .. 52 are covered and recall is exactly 53/100.
    real = np.arange(100.0)[:, None] * np.array([[1.0, 0.0]])
    fake = real[:50]
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(0.53, abs=1e-12)


def test_precision_recall_validates_inputs():
    with pytest.raises(ValueError, match="at least 4 rows"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(np.full((10, 2), np.nan), np.zeros((10, 2)))
