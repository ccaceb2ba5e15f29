import math

import pytest
import torch

from inkwash.core.schedule import NoiseSchedule, ScheduleConfig, make_betas


def test_linear_betas_are_the_seeds():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.all(betas[1:] > betas[:-1])


def test_cosine_alpha_bar_follows_nichol_dhariwal():
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="cosine"))
    s = 0.008
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    # Clipping at beta = 0.999 only touches the very last steps.
    assert torch.allclose(schedule.alpha_bar[:990], f[:990], rtol=1e-10, atol=1e-12)


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    roots = betas.sqrt()
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(999), atol=1e-12)


def test_unknown_beta_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("t", [0, 1, 99, 500, 999])
def test_q_sample_moments_match_closed_form(t):
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(t)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    x_t = schedule.q_sample(x0, torch.full((n,), t), noise)
    alpha_bar = schedule.alpha_bar[t].item()
    expected_mean = math.sqrt(alpha_bar) * 0.7
    expected_var = 1 - alpha_bar
    # Sampling error: 5 standard errors of the mean and of the variance.
    assert abs(x_t.mean().item() - expected_mean) < 5 * math.sqrt(expected_var / n)
    assert abs(x_t.var().item() - expected_var) < 5 * expected_var * math.sqrt(2 / n)


def test_q_sample_is_the_markov_chain():
    """One closed-form draw has the same moments as t successive single-step noisings."""
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(0)
    n, t = 100_000, 300
    x = torch.full((n,), 0.5, dtype=torch.float64)
    for step in range(t + 1):
        beta = schedule.betas[step]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, generator=generator, dtype=torch.float64)
    alpha_bar = schedule.alpha_bar[t].item()
    assert abs(x.mean().item() - math.sqrt(alpha_bar) * 0.5) < 5 * math.sqrt((1 - alpha_bar) / n)
    assert abs(x.var().item() - (1 - alpha_bar)) < 5 * (1 - alpha_bar) * math.sqrt(2 / n)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_matches_bayes_rule(t):
    """q(x_{t-1} | x_t, x0) is the product of q(x_t | x_{t-1}) and q(x_{t-1} | x0)."""
    schedule = NoiseSchedule()
    x0 = torch.tensor([0.3, -0.8], dtype=torch.float64)
    x_t = torch.tensor([1.1, 0.2], dtype=torch.float64)
    alpha, beta = schedule.alphas[t], schedule.betas[t]
    alpha_bar_prev = schedule.alpha_bar[t - 1]
    precision = alpha / beta + 1 / (1 - alpha_bar_prev)
    mean = (alpha.sqrt() / beta * x_t + alpha_bar_prev.sqrt() / (1 - alpha_bar_prev) * x0) / precision
    got_mean, got_var = schedule.posterior(x0, x_t, t)
    assert torch.allclose(got_mean, mean, rtol=1e-10)
    assert got_var == pytest.approx(1 / precision.item(), rel=1e-10)


def test_posterior_rejects_t0():
    with pytest.raises(ValueError):
        NoiseSchedule().posterior(torch.zeros(1), torch.zeros(1), 0)


def test_sigma_t_round_trip_and_fractional_t():
    schedule = NoiseSchedule()
    t = torch.tensor([0.0, 1.0, 10.0, 499.0, 999.0])
    assert torch.allclose(schedule.t_to_sigma(t), schedule.sigmas[t.long()], rtol=1e-12)
    assert torch.allclose(schedule.sigma_to_t(schedule.sigmas[t.long()]), t.double(), atol=1e-9)
    fractional = torch.tensor([0.25, 10.5, 998.75], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(fractional)), fractional, atol=1e-9)
    # Log-sigma is interpolated linearly between neighbours.
    mid = schedule.t_to_sigma(10.5).item()
    assert mid == pytest.approx(math.sqrt(schedule.sigmas[10].item() * schedule.sigmas[11].item()))
    # Out-of-range sigmas clamp to the ends.
    assert schedule.sigma_to_t(1e-6).item() == 0.0
    assert schedule.sigma_to_t(1e6).item() == 999.0


def test_alpha_bar_sigma_and_snr():
    schedule = NoiseSchedule()
    alpha_bar = schedule.alpha_bar[[0, 400, 999]]
    sigma = schedule.alpha_bar_to_sigma(alpha_bar)
    assert torch.allclose(schedule.sigma_to_alpha_bar(sigma), alpha_bar, rtol=1e-12)
    assert torch.allclose(schedule.snr(torch.tensor([0, 400, 999])), alpha_bar / (1 - alpha_bar), rtol=1e-9)


def test_zero_terminal_snr_rescaling():
    plain = NoiseSchedule()
    zero = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    assert zero.alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-15)
    assert zero.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-12)
    assert torch.all(zero.alpha_bar[1:] < zero.alpha_bar[:-1])
    # The infinite last sigma is replaced by a log-linear extension: finite and still increasing.
    assert math.isfinite(zero.sigma_max)
    assert zero.sigma_max == pytest.approx(zero.sigmas[-2].item() ** 2 / zero.sigmas[-3].item())
    assert torch.all(zero.sigmas[1:] > zero.sigmas[:-1])


def test_sigmoid_betas():
    betas = make_betas("sigmoid", 1000)
    assert torch.all(betas[1:] > betas[:-1])
    assert 1e-4 < betas[0].item() < 2e-4 and 0.0199 < betas[-1].item() < 0.02
