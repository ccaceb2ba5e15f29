import math

import pytest
import torch

from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.sampling.samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm

SCHEDULE = NoiseSchedule()


def _noise(seed: int, shape, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=generator, dtype=dtype)


def _run(info_id, denoiser, n, dim, steps, spacing="trailing", seed=0, **options):
    sigmas = build_sigmas(SCHEDULE, steps, spacing)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64) * math.sqrt(1 + sigmas[0].item() ** 2)
    return get_sampler(info_id).fn(denoiser, x, sigmas, noise=_noise(seed + 1, (n, dim)), **options)


@pytest.mark.parametrize(
    ("sampler", "steps", "options"),
    [
        ("ddpm", 1000, {"variance": "beta_tilde"}),
        ("ddpm", 1000, {"variance": "beta"}),
        ("ddim", 500, {"eta": 0.0}),
        ("ddim", 1000, {"eta": 1.0}),
    ],
)
def test_exact_gaussian_denoiser_reproduces_mean_and_covariance(gaussian_data, sampler, steps, options):
    mean, cov, denoiser = gaussian_data
    n = 20_000
    samples = _run(sampler, denoiser, n, mean.numel(), steps, **options)
    assert torch.isfinite(samples).all()
    emp_mean = samples.mean(0)
    emp_cov = torch.cov(samples.T)
    std = cov.diagonal().sqrt()
    # Monte-Carlo error bounds (5 standard errors) plus 2% of the largest variance for the samplers'
    # own discretisation error, which test_covariance_error_shrinks_with_steps shows vanishing.
    assert torch.all((emp_mean - mean).abs() < 5 * std / math.sqrt(n) + 0.01)
    cov_se = ((std[:, None] * std[None, :]) ** 2 + cov**2).sqrt() / math.sqrt(n)
    assert torch.all((emp_cov - cov).abs() < 5 * cov_se + 0.02 * cov.diagonal().max())


@pytest.mark.parametrize(("sampler", "options"), [("ddpm", {}), ("ddim", {"eta": 0.0})])
def test_covariance_error_shrinks_with_steps(gaussian_data, sampler, options):
    mean, cov, denoiser = gaussian_data
    errors = []
    for steps in (10, 100, 1000):
        samples = _run(sampler, denoiser, 20_000, mean.numel(), steps, **options)
        errors.append((torch.cov(samples.T) - cov).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_wrong_covariance_is_detected(gaussian_data):
    """The moment check above can fail: a sampler run with too few steps misses the covariance."""
    mean, cov, denoiser = gaussian_data
    samples = _run("ddim", denoiser, 20_000, mean.numel(), 1, eta=0.0)
    assert (torch.cov(samples.T) - cov).abs().max() > 0.05


def test_ddim_eta_one_is_ddpm_with_posterior_variance(gaussian_data):
    _, _, denoiser = gaussian_data
    a = _run("ddim", denoiser, 64, 4, 25, eta=1.0)
    b = _run("ddpm", denoiser, 64, 4, 25, variance="beta_tilde")
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddpm_step_is_the_posterior(variance, t):
    """One DDPM step from t to t-1 with a known x0 is Ho et al.'s posterior (Eqs. 6-7)."""
    x0 = torch.tensor([[0.4, -0.3, 0.9]], dtype=torch.float64)
    x_t_vp = torch.tensor([[0.1, 0.5, -1.2]], dtype=torch.float64)
    z = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    sigma, sigma_prev = SCHEDULE.sigmas[t], SCHEDULE.sigmas[t - 1]
    x = x_t_vp / SCHEDULE.alpha_bar[t].sqrt()  # the denoiser's x0 + sigma * eps form
    out = sample_ddpm(lambda x, s, c=None: x0, x, torch.stack([sigma, sigma_prev]), noise=lambda: z, variance=variance)
    mean, var = SCHEDULE.posterior(x0, x_t_vp, t)
    if variance == "beta":
        var = SCHEDULE.betas[t].item()
    expected = mean + math.sqrt(var) * z
    assert torch.allclose(out * SCHEDULE.alpha_bar[t - 1].sqrt(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("info", list(SAMPLERS.values()), ids=list(SAMPLERS))
class TestContract:
    def test_shape_dtype_and_determinism(self, info, tiny_denoiser):
        sigmas = build_sigmas(SCHEDULE, 4)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(3, 1, 16, 16, dtype=dtype)
            a = info.fn(tiny_denoiser, x, sigmas, noise=_noise(0, x.shape, dtype))
            b = info.fn(tiny_denoiser, x, sigmas, noise=_noise(0, x.shape, dtype))
            assert a.shape == x.shape and a.dtype == dtype
            assert torch.equal(a, b)

    def test_one_step_returns_the_denoised_estimate(self, info, gaussian_data):
        _, _, denoiser = gaussian_data
        x = torch.randn(5, 4, dtype=torch.float64) * 100
        sigmas = torch.tensor([SCHEDULE.sigma_max, 0.0], dtype=torch.float64)
        out = info.fn(denoiser, x, sigmas, noise=_noise(0, x.shape))
        assert torch.allclose(out, denoiser(x, torch.full((5,), SCHEDULE.sigma_max)), atol=1e-12)

    def test_zero_steps_is_identity(self, info, gaussian_data):
        _, _, denoiser = gaussian_data
        x = torch.randn(2, 4, dtype=torch.float64)
        assert torch.equal(info.fn(denoiser, x, torch.zeros(1, dtype=torch.float64)), x)

    def test_callback_sees_every_sigma(self, info, gaussian_data):
        _, _, denoiser = gaussian_data
        sigmas = build_sigmas(SCHEDULE, 7)
        seen = []
        info.fn(
            denoiser,
            torch.randn(2, 4, dtype=torch.float64) * 80,
            sigmas,
            noise=_noise(0, (2, 4)),
            callback=lambda s: seen.append((s["sigma"], s["sigma_next"])),
        )
        assert [s for s, _ in seen] == sigmas[:-1].tolist()
        assert seen[-1][1] == 0.0

    @pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 333, 999, 1000])
    def test_finite_at_any_step_count(self, info, gaussian_data, steps):
        _, _, denoiser = gaussian_data
        out = _run(info.id, denoiser, 8, 4, steps)
        assert torch.isfinite(out).all()


def test_registry_accepts_ids_and_display_names():
    assert get_sampler("DDIM").id == "ddim"
    assert get_sampler("ddpm").display_name == "DDPM"
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler_z")


def test_bad_options():
    with pytest.raises(ValueError):
        sample_ddim(lambda x, s, c=None: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), eta=-1)
    with pytest.raises(ValueError):
        sample_ddpm(lambda x, s, c=None: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), variance="x")
