"""Distances between point clouds.

The sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015):

    SW2(a, b)^2 = E_theta[ W2(theta . a, theta . b)^2 ],   theta uniform on the unit sphere S^{D-1},

estimated with ``num_projections`` random directions. In one dimension W2 is a quantile match,
``W2(P, Q)^2 = int_0^1 (F_P^{-1}(q) - F_Q^{-1}(q))^2 dq``, evaluated at the L = max(N, M)
midpoint levels ``q_i = (i + 1/2) / L`` with the empirical quantile function
``F^{-1}(q) = s[floor(q n)]`` (s the sorted sample, 0-based: the point whose probability cell
``[j/n, (j+1)/n)`` holds q). With N == M this is exactly the matching of sorted samples,
``mean_i (a_(i) - b_(i))^2``; with N != M it is a midpoint-rule approximation of the integral
(exact whenever max(N, M) is a multiple of min(N, M)). Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

_CHUNK = 64  # projections handled at once: memory ~ (N + M + 2 max(N, M)) * _CHUNK float64s


def _points(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) or (N, ...) -> (N, D) float64; at least one point."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no points")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def _quantile_index(n: int, levels: int, device: torch.device) -> torch.Tensor:
    """0-based sorted-sample index of the empirical quantile at q_i = (i + 1/2) / levels, i < levels.

    ``floor(q_i n) = floor((2 i + 1) n / (2 levels))`` in exact integer arithmetic; the identity
    when n == levels.
    """
    i = torch.arange(levels, device=device, dtype=torch.int64)
    return ((2 * i + 1) * n // (2 * levels)).clamp_(max=n - 1)


def sliced_wasserstein(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 2-Wasserstein distance between point clouds a (N, D) and b (M, D).

    ``sqrt(mean_p W2(theta_p . a, theta_p . b)^2)`` over ``num_projections`` directions
    ``theta_p = z_p / |z_p|``, z_p ~ N(0, I_D) drawn on the CPU from ``generator`` (torch's
    global generator when None), so a fixed generator seed gives a reproducible value. Trailing
    dimensions beyond the first are flattened, so image batches (N, C, H, W) work too.
    """
    a = _points(a, "a")
    b = _points(b, "b").to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    num_projections = int(num_projections)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    dim = a.shape[1]
    directions = torch.randn(dim, num_projections, generator=generator, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(a.device)  # (D, P)
    levels = max(a.shape[0], b.shape[0])
    index_a = None if a.shape[0] == levels else _quantile_index(a.shape[0], levels, a.device)
    index_b = None if b.shape[0] == levels else _quantile_index(b.shape[0], levels, a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, num_projections, _CHUNK):
        theta_t = directions[:, start : start + _CHUNK].T.contiguous()  # (chunk, D)
        qa = _sort_rows(theta_t @ a.T, index_a)  # (chunk, L) quantiles of each projection
        qb = _sort_rows(theta_t @ b.T, index_b)
        total += (qa - qb).square().mean(dim=1).sum()
    return float((total / num_projections).sqrt())


def _sort_rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Sort each row of a temporary (in place on the CPU), then pick the columns ``index`` (all when None).

    On the CPU numpy's sort is several times faster than torch's.
    """
    if x.device.type == "cpu":
        x = x.contiguous()
        x.numpy().sort(axis=1)  # shares x's memory
    else:
        x = x.sort(dim=1).values
    return x if index is None else x[:, index]
