"""The noise schedule: the one owner of beta -> alpha_bar -> sigma <-> t conversions.

Everything is computed in float64 and cast to the caller's dtype at the edge. The EDM /
k-diffusion convention is used throughout: a DDPM state ``x_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps`` corresponds to ``x = x_t / sqrt(alpha_bar) = x0 + sigma eps`` with
``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear", "sigmoid")


def make_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return the T betas of a named schedule, float64."""
    if kind == "linear":
        # Ho et al. 2020, Sec. 4: linear from 1e-4 to 0.02 (scaled here for T != 1000).
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        # Stable Diffusion: linear in sqrt(beta).
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17, with s = 0.008 and betas clipped at 0.999.
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if kind == "sigmoid":
        # GeoDiff (Xu et al. 2022): a sigmoid ramp between beta_start and beta_end.
        ramp = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64))
        return ramp * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta schedule {kind!r}; choose from {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR and the first is unchanged
    (Lin et al. 2023, Algorithm 1)."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class ScheduleConfig:
    """Settings that define a discrete noise schedule (stored in every checkpoint)."""

    beta_schedule: str = "linear"
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class NoiseSchedule:
    """A discrete DDPM schedule of T steps, t = 0 .. T-1 (t = 0 is the least noisy)."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        if self.config.num_steps < 2:
            raise ValueError("a noise schedule needs at least 2 steps")
        self.betas = make_betas(
            self.config.beta_schedule,
            self.config.num_steps,
            self.config.beta_start,
            self.config.beta_end,
        )  # (T,) float64
        if self.config.zero_terminal_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.sigmas = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()  # increasing in t
        if not torch.isfinite(self.sigmas[-1]):
            # Zero terminal SNR makes sigma_T infinite, which no sampler can start from. Extend
            # log-sigma linearly from the two steps before it instead (finite and still increasing;
            # diffusers clamps alpha_bar_T to 2^-24, which can fall above alpha_bar_{T-1}).
            log = self.sigmas[-3:-1].log()
            self.sigmas[-1] = (2 * log[1] - log[0]).exp()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # ---- conversions -------------------------------------------------------------------
    @staticmethod
    def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + sigma.double() ** 2)

    @staticmethod
    def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
        alpha_bar = alpha_bar.double()
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_steps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        frac = t - low
        log_sigma = (1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The (fractional) timestep whose log-sigma matches, the inverse of ``t_to_sigma``.

        Sigmas outside [sigma_min, sigma_max] are clamped to t = 0 or T-1.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=1e-300).log()
        # Index of the first table entry above log_sigma, so low <= log_sigma < high.
        high = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1)).reshape(sigma.shape)
        high = high.clamp(1, self.num_steps - 1)
        low = high - 1
        low_val, high_val = self.log_sigmas[low], self.log_sigmas[high]
        frac = ((log_sigma - low_val) / (high_val - low_val)).clamp(0, 1)
        return low.double() + frac

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2."""
        return 1.0 / self.t_to_sigma(t) ** 2

    # ---- the forward process -------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form sample of q(x_t | x_0) at integer steps t (Ho et al. 2020, Eq. 4).

        ``x0`` and ``noise`` are (B, ...), ``t`` is (B,) of ints in [0, T).
        """
        alpha_bar = self.alpha_bar.to(x0.device)[t.long()]  # (B,)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        signal = alpha_bar.sqrt().to(x0.dtype).reshape(shape)
        noise_scale = (1 - alpha_bar).sqrt().to(x0.dtype).reshape(shape)
        return signal * x0 + noise_scale * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7), for t >= 1."""
        if not 1 <= t < self.num_steps:
            raise ValueError(f"posterior needs 1 <= t < {self.num_steps}, got {t}")
        alpha_bar, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar[t - 1]
        beta = self.betas[t]
        coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
        coef_xt = self.alphas[t].sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        variance = float((1 - alpha_bar_prev) / (1 - alpha_bar) * beta)
        return float(coef_x0) * x0 + float(coef_xt) * x_t, variance
