"""The exact denoiser of an isotropic Gaussian mixture: a ground truth for samplers and metrics.

Data ``p(x0) = sum_k w_k N(x0; mu_k, s_k^2 I)`` in dimension D, noised as ``x = x0 + sigma * eps``
(EDM / k-diffusion convention). Every quantity is closed form:

* marginal: ``p_sigma(x) = sum_k w_k N(x; mu_k, v_k I)`` with ``v_k = s_k^2 + sigma^2``;
* responsibilities: ``r_k(x) = w_k N(x; mu_k, v_k I) / p_sigma(x)``, computed in log space with
  logsumexp, so they stay finite for sigma from 0 to 1e4 and for x far from every mode;
* posterior mean (the ideal denoiser):
  ``E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / v_k (x - mu_k))
             = sum_k r_k(x) (c_k x + (1 - c_k) mu_k)``, ``c_k = s_k^2 / v_k``, ``1 - c_k = sigma^2 / v_k``;
* Tweedie: ``E[x0 | x] = x + sigma^2 grad_x log p_sigma(x)``.

Everything is computed in float64. A mixture is saved as an ``.npz`` with ``weights`` [K],
``means`` [K, D] and ``stds`` [K]; it is read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes

NPZ_KEYS = ("weights", "means", "stds")


def _float64(value, name: str) -> torch.Tensor:
    """A float64 CPU copy; Python lists and numpy arrays are read at full (double) precision."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be real numbers, got dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64).clone()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not a numeric array: {exc}") from None
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.float64, copy=True))


class GaussianMixture:
    """``p(x0) = sum_k w_k N(mu_k, s_k^2 I)``, its exact denoiser, noised log density and exact samples.

    ``weights`` (K,) non-negative, not all zero (normalised here to sum to 1), ``means`` (K, D),
    ``stds`` (K,) positive. Stored as float64 CPU tensors; moved to x's device when called.
    """

    def __init__(self, weights, means, stds) -> None:
        weights = _float64(weights, "weights")
        means = _float64(means, "means")
        stds = _float64(stds, "stds")
        if weights.ndim != 1 or weights.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(weights.shape)}")
        num = weights.numel()
        if means.ndim != 2 or means.shape[0] != num or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K={num}, D) with D >= 1, got {tuple(means.shape)}")
        if stds.shape != (num,):
            raise ValueError(f"stds must have shape (K={num},), got {tuple(stds.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
        total = weights.sum()
        if not total > 0 or not torch.isfinite(total):
            raise ValueError("weights must not all be zero")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        if not torch.isfinite(stds).all() or (stds <= 0).any():
            raise ValueError("stds must be finite and positive")
        self.weights = weights / total  # (K,)
        self.means = means  # (K, D)
        self.stds = stds  # (K,)

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"

    # ---- helpers -------------------------------------------------------------------------------

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> (B, D) float64; the trailing size must be D."""
        x = torch.as_tensor(x)
        if x.ndim == 0:
            raise ValueError("x must have a batch dimension, got a scalar")
        trailing = math.prod(x.shape[1:])
        if trailing != self.dim:
            raise ValueError(
                f"x has {trailing} values per sample (shape {tuple(x.shape)}) but the mixture has D={self.dim}"
            )
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    @staticmethod
    def _sigma(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """Sigma as a (B,) float64 tensor; a float, a 0-d tensor or any tensor of B values."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        elif sigma.numel() != batch:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
        if not (torch.isfinite(sigma) & (sigma >= 0)).all():
            raise ValueError("sigma must be finite and >= 0")
        return sigma

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weights.to(device), self.means.to(device), self.stds.to(device)

    def _log_joint(self, flat: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log w_k + log N(x; mu_k, v_k I)`` (B, K) and the variances ``v_k = s_k^2 + sigma^2`` (B, K).

        ``log N(x; mu, v I) = -D/2 log(2 pi v) - |x - mu|^2 / (2 v)``; |x - mu|^2 is summed per
        component (no |x|^2 - 2 x.mu + |mu|^2 cancellation, no (B, K, D) temporary).
        """
        weights, means, stds = self._params(flat.device)
        var = stds.square()[None, :] + sigma.square()[:, None]  # (B, K), > 0 since s_k > 0
        dist2 = torch.stack([(flat - mean).square().sum(dim=1) for mean in means], dim=1)  # (B, K)
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * var) - dist2 / (2 * var)
        return torch.log(weights)[None, :] + log_norm, var

    # ---- public API ----------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The exact denoiser ``E[x0 | x0 + sigma * eps = x] = sum_k r_k (c_k x + (1 - c_k) mu_k)``.

        x (B, ...) with D values per sample; sigma a float, 0-d or (B,) tensor. ``cond`` is ignored
        (the mixture is unconditional). Rows with sigma = 0 return x exactly. The result has x's
        shape and dtype (computed in float64).
        """
        x = torch.as_tensor(x)
        flat = self._flatten(x)
        sigma = self._sigma(sigma, flat.shape[0], flat.device)
        _, means, stds = self._params(flat.device)
        log_joint, var = self._log_joint(flat, sigma)
        resp = torch.softmax(log_joint, dim=1)  # (B, K)
        keep = stds.square()[None, :] / var  # c_k = s_k^2 / v_k
        pull = sigma.square()[:, None] / var  # 1 - c_k = sigma^2 / v_k, computed without cancellation
        out = (resp * keep).sum(dim=1, keepdim=True) * flat + (resp * pull) @ means  # (B, D)
        out = torch.where((sigma == 0)[:, None], flat, out)
        return out.to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``log p_sigma(x) = logsumexp_k [log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I)]``, (B,) float64.

        Differentiable in x (Tweedie: ``E[x0 | x] = x + sigma^2 grad_x log p_sigma(x)``).
        """
        flat = self._flatten(x)
        sigma = self._sigma(sigma, flat.shape[0], flat.device)
        log_joint, _ = self._log_joint(flat, sigma)
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``r_k(x) = P(component k | x)`` under the sigma-noised mixture, (B, K) float64 rows summing to 1."""
        flat = self._flatten(x)
        sigma = self._sigma(sigma, flat.shape[0], flat.device)
        log_joint, _ = self._log_joint(flat, sigma)
        return torch.softmax(log_joint, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws: ``k ~ Categorical(w)``, ``x0 = mu_k + s_k * z``, z ~ N(0, I).

        Returns samples (n, D) float64 and their component labels (n,) long, on the CPU.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, self.dim, dtype=torch.float64), torch.empty(0, dtype=torch.long)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * noise, labels

    def mean(self) -> torch.Tensor:
        """The data mean ``sum_k w_k mu_k``, (D,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """The data covariance ``sum_k w_k (s_k^2 I + mu_k mu_k^T) - m m^T``, (D, D)."""
        mean = self.mean()
        second = (self.weights[:, None] * self.means).T @ self.means
        second += float(self.weights @ self.stds.square()) * torch.eye(self.dim, dtype=torch.float64)
        return second - torch.outer(mean, mean)

    def ode_solution(
        self, x: torch.Tensor, sigma_start: float, *, steps: int = 500, sigma_min: float = 1e-4
    ) -> torch.Tensor:
        """Where the probability-flow ODE ``dx/dsigma = (x - E[x0 | x]) / sigma`` carries ``x`` from
        ``sigma_start`` down to 0: the point a perfect deterministic sampler reaches from the same start.

        In ``u = log sigma`` the ODE is ``dx/du = x - E[x0 | x]``, smooth and bounded at every noise
        level; it is integrated with classical fourth-order Runge-Kutta over ``steps`` equal steps
        from ``sigma_start`` to ``sigma_min`` (4 denoiser calls each), and the last stretch to 0 is
        the denoiser's value at ``sigma_min`` (at 1e-4 it is within 1e-7 of the limit). For a single
        Gaussian it matches the closed form ``mu + (x - mu) s / sqrt(s^2 + sigma_start^2)`` to 1e-7
        relative (tests/test_oracle.py): far below any sampler's error at 1000 NFE.
        """
        if not sigma_start > sigma_min:
            raise ValueError(f"sigma_start must exceed sigma_min = {sigma_min}, got {sigma_start}")
        x = torch.as_tensor(x, dtype=torch.float64)
        h = (math.log(sigma_min) - math.log(sigma_start)) / steps

        def slope(point: torch.Tensor, at: float) -> torch.Tensor:
            return point - self(point, math.exp(at))

        for i in range(steps):
            u = math.log(sigma_start) + i * h
            k1 = slope(x, u)
            k2 = slope(x + h / 2 * k1, u + h / 2)
            k3 = slope(x + h / 2 * k2, u + h / 2)
            k4 = slope(x + h * k3, u + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return self(x, sigma_min)

    def mode_weights(self, samples: torch.Tensor) -> torch.Tensor:
        """Fraction of samples whose most responsible component at sigma 0 is k, (K,) float64.

        ``argmax_k [log w_k + log N(x; mu_k, s_k^2 I)]`` per sample, then a normalised histogram.
        """
        flat = self._flatten(samples)
        if flat.shape[0] == 0:
            raise ValueError("mode_weights needs at least one sample")
        sigma = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
        log_joint, _ = self._log_joint(flat, sigma)
        counts = torch.bincount(log_joint.argmax(dim=1).cpu(), minlength=self.num_components)
        return counts.to(torch.float64) / flat.shape[0]

    def mode_weight_error(self, samples: torch.Tensor) -> float:
        """Total variation between the samples' mode weights and w: ``0.5 * sum_k |m_k - w_k|`` in [0, 1]."""
        return 0.5 * float((self.mode_weights(samples) - self.weights).abs().sum())

    def save(self, path: str | Path) -> None:
        """Write ``weights`` [K], ``means`` [K, D], ``stds`` [K] (float64) to an .npz at exactly ``path``."""
        buffer = io.BytesIO()
        np.savez(buffer, **{key: getattr(self, key).numpy() for key in NPZ_KEYS})
        atomic_write_bytes(path, buffer.getvalue())


# ---- presets -------------------------------------------------------------------------------------


def _gmm2d() -> GaussianMixture:
    """Nine modes for pictures: eight on the unit circle (angles 2 pi k / 8) plus one at the origin.

    Unequal weights (max/min = 3.2) and stds 0.05-0.10, so the data lies in about [-1.25, 1.25]^2.
    """
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    ring = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (8, 2), radius 1
    means = torch.cat([ring, torch.zeros(1, 2, dtype=torch.float64)])
    weights = torch.tensor([1.6, 0.5, 1.0, 0.7, 1.3, 0.6, 1.1, 0.8, 1.0], dtype=torch.float64)
    stds = torch.tensor([0.05, 0.08, 0.06, 0.07, 0.05, 0.08, 0.06, 0.07, 0.10], dtype=torch.float64)
    return GaussianMixture(weights, means, stds)


def _gmm64() -> GaussianMixture:
    """Ten modes in 64 dimensions, drawn once from a fixed-seed torch.Generator.

    Means ~ N(0, 0.6^2 I) (norm ~ 4.8, modes ~ 6.8 apart); weights a geometric sequence
    0.8^k (max/min ~ 7.5); stds evenly spaced in [0.1, 0.4], assigned in a fixed random order.
    The per-coordinate data std is about 0.6. The samplers' default step schedules were chosen on this
    mixture (seed 0); ``gmm48`` is the held-out check.
    """
    generator = torch.Generator().manual_seed(20240611)
    num, dim = 10, 64
    means = 0.6 * torch.randn(num, dim, generator=generator, dtype=torch.float64)
    weights = 0.8 ** torch.arange(num, dtype=torch.float64)
    stds = torch.linspace(0.1, 0.4, num, dtype=torch.float64)[torch.randperm(num, generator=generator)]
    return GaussianMixture(weights, means, stds)


def _gmm48() -> GaussianMixture:
    """The held-out check: a mixture that played no part in choosing the samplers' default step schedules."""
    # Unlike gmm64 (on which those defaults were chosen) in every parameter: 16 modes in 48 dimensions
    # from another seed; means ~ N(0, 0.5^2 I) (norm ~ 3.5, modes at least 3.4 apart); Zipf weights
    # 1/k (max/min = 16); stds log-spaced over [0.05, 0.5] (10x), assigned in a fixed random order.
    # The per-coordinate data std is about 0.51.
    generator = torch.Generator().manual_seed(20261128)
    num, dim = 16, 48
    means = 0.5 * torch.randn(num, dim, generator=generator, dtype=torch.float64)
    weights = 1.0 / torch.arange(1, num + 1, dtype=torch.float64)
    stds = torch.logspace(math.log10(0.05), math.log10(0.5), num, dtype=torch.float64)
    stds = stds[torch.randperm(num, generator=generator)]
    return GaussianMixture(weights, means, stds)


PRESETS: dict[str, Callable[[], GaussianMixture]] = {"gmm2d": _gmm2d, "gmm64": _gmm64, "gmm48": _gmm48}


def preset(name: str) -> GaussianMixture:
    """Build a named mixture (see PRESETS)."""
    if name not in PRESETS:
        raise InkwashError(f"unknown mixture preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_gmm(spec: str | Path) -> GaussianMixture:
    """A preset name, or the path of an .npz with ``weights`` [K], ``means`` [K, D], ``stds`` [K]."""
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if not path.is_file():
        raise InkwashError(
            f"mixture file not found: {path} (and not a preset; presets are: {', '.join(sorted(PRESETS))})"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise InkwashError(f"cannot read mixture file {path}: {_first_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InkwashError(f"{path} is not an .npz archive (it holds a single array)")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise InkwashError(f"{path} lacks the key(s) {', '.join(missing)} (needs {', '.join(NPZ_KEYS)})")
        try:
            arrays = {key: archive[key] for key in NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InkwashError(f"cannot read mixture file {path}: {_first_line(exc)}") from None
    for key, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise InkwashError(f"{path}: {key} must be a real number array, got dtype {array.dtype}")
    weights, means, stds = arrays["weights"], arrays["means"], arrays["stds"]
    if weights.ndim != 1 or means.ndim != 2 or stds.ndim != 1 or not (len(weights) == len(means) == len(stds)):
        raise InkwashError(
            f"{path}: expected weights [K], means [K, D], stds [K]; got weights {list(weights.shape)}, "
            f"means {list(means.shape)}, stds {list(stds.shape)}"
        )
    try:
        return GaussianMixture(weights, means, stds)
    except ValueError as exc:
        raise InkwashError(f"{path}: {exc}") from None
