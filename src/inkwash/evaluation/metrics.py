"""Distances between two sets of image features: Fréchet distance, KID, improved precision and recall.

Pure math on (N, F) feature arrays, in float64; the networks that make the features live in
``features.py``. Each function takes the real (reference) set first where the metric is not symmetric.
"""

from __future__ import annotations

import numpy as np

_ROWS = 1024  # rows of a distance matrix computed at once: memory ~ _ROWS * N float64s


def _features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    """(N, F) float64 with at least ``min_rows`` rows, all finite."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F), got {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values")
    return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, N >= 2."""
    features = _features(features, "features", min_rows=2)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition.

    Tiny negative eigenvalues (rounding, or a rank-deficient covariance from fewer samples than
    features) are clipped to 0, so the root is always real.
    """
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mean1, cov1) and N(mean2, cov2) (Heusel et al. 2017).

    ``|m1 - m2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``. The trace of ``(S1 S2)^1/2``
    is taken through the symmetric matrix ``S1^1/2 S2 S1^1/2``, which is similar to ``S1 S2`` and has
    real non-negative eigenvalues, so no complex ``sqrtm`` or epsilon on the diagonal is needed.
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    dim = mean1.shape[0]
    if mean1.shape != (dim,) or mean2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"shapes do not match: means {mean1.shape}, {mean2.shape}; covariances {cov1.shape}, {cov2.shape}"
        )
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mean1 - mean2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * cross
    # Equal statistics give 0 up to rounding, which can land a few ulps below it.
    return float(max(value, 0.0))


def frechet_distance_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID-style Fréchet distance between the Gaussians fitted to two (N, F) feature sets."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (a . b / d + 1)^3, the cubic kernel of Bińkowski et al. 2018."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 with the cubic kernel (Gretton et al. 2012, Lemma 6).

    The within-set means leave out the diagonal k(x_i, x_i), which is what makes the estimate
    unbiased: its expectation is 0 when x and y come from one distribution.
    """
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD^2 averaged over random subsets; (mean, std).

    Each of ``num_subsets`` rounds draws min(subset_size, N_real, N_fake) rows of each set without
    replacement from a ``seed``-ed generator, as torch-fidelity and the KID paper's code do.
    """
    real = _features(real, "real", min_rows=2)
    fake = _features(fake, "fake", min_rows=2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError("KID needs num_subsets >= 1 and subset_size >= 2")
    size = min(subset_size, real.shape[0], fake.shape[0])
    generator = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(
            real[generator.choice(real.shape[0], size, replace=False)],
            fake[generator.choice(fake.shape[0], size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    """|a_i - b_j|^2 (len(a), len(b)), clipped at 0 against rounding."""
    return ((a * a).sum(axis=1)[:, None] + b_norms[None, :] - 2 * a @ b.T).clip(min=0)


def knn_radii(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point, (N,)."""
    if not 1 <= k < points.shape[0]:
        raise ValueError(f"k must be in 1..{points.shape[0] - 1} for {points.shape[0]} points, got {k}")
    norms = (points * points).sum(axis=1)
    radii = np.empty(points.shape[0])
    for start in range(0, points.shape[0], _ROWS):
        block = _squared_distances(points[start : start + _ROWS], points, norms)
        # Column 0 of the partition is the point itself (distance 0), so index k is the k-th neighbour.
        radii[start : start + _ROWS] = np.partition(block, k, axis=1)[:, k]
    return radii


def _coverage(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of queries inside at least one ball |q - c_j|^2 <= r_j."""
    norms = (centres * centres).sum(axis=1)
    inside = 0
    for start in range(0, queries.shape[0], _ROWS):
        block = _squared_distances(queries[start : start + _ROWS], centres, norms)
        inside += int((block <= radii[None, :]).any(axis=1).sum())
    return inside / queries.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-2) with k-NN manifolds.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision is the fraction of fake points inside the real manifold (fidelity);
    recall the fraction of real points inside the fake manifold (coverage).
    """
    real = _features(real, "real", min_rows=k + 1)
    fake = _features(fake, "fake", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    precision = _coverage(fake, real, knn_radii(real, k))
    recall = _coverage(real, fake, knn_radii(fake, k))
    return precision, recall
