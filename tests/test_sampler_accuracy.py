"""Accuracy of every sampler against closed forms for Gaussian data.

For data N(mean, cov) the probability-flow ODE has the exact solution
x(s1) = mean + sqrt((cov + s1^2) / (cov + s0^2)) (x(s0) - mean) along the eigenvectors of cov, so each
deterministic solver's global error, and its order, can be measured without training anything.
"""

import math

import pytest
import torch

from conftest import GaussianDenoiser
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.sampling.samplers import SAMPLERS

GEN = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=GEN, dtype=torch.float64))
EIGENVALUES = torch.tensor([0.02, 0.1, 0.3, 0.8], dtype=torch.float64)
MEAN = torch.randn(4, generator=GEN, dtype=torch.float64) * 0.3
COV = Q @ torch.diag(EIGENVALUES) @ Q.T
DENOISER = GaussianDenoiser(MEAN, COV)


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    y = (x - MEAN) @ Q * torch.sqrt((EIGENVALUES + sigma_to**2) / (EIGENVALUES + sigma_from**2))
    return MEAN + y @ Q.T


# (sampler, expected order of the global error, tolerance on the measured slope)
ORDERS = [
    ("euler", 1.0, 0.15),
    ("ddim", 1.0, 0.15),  # DDIM with eta = 0 is Euler's method in the x0 + sigma*eps form
    ("heun", 2.0, 0.2),
    ("dpm_2", 2.0, 0.2),
    ("dpmpp_2m", 2.0, 0.2),
    ("unipc", 3.0, 0.5),  # order-2 UniP plus UniC raises the order by one (Zhao et al. 2023, Thm 3.3)
]


@pytest.mark.parametrize(("sampler", "order", "tolerance"), ORDERS)
def test_deterministic_solver_order(sampler, order, tolerance):
    sigma_max, sigma_min = 20.0, 0.05
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20
    reference = exact_flow(x, sigma_max, sigma_min)
    errors = []
    for steps in (16, 32, 64):
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64))
        out = SAMPLERS[sampler].fn(DENOISER, x.clone(), sigmas)
        errors.append(((out - reference).norm() / reference.norm()).item())
    slope = math.log2(errors[-2] / errors[-1])
    assert abs(slope - order) < tolerance, (errors, slope)


@pytest.mark.parametrize(("sampler", "minimum"), [("lms", 3.2), ("plms", 1.8)])
def test_linear_multistep_order(sampler, minimum):
    """LMS integrates exact Lagrange polynomials, so it approaches order 4. PLMS uses PNDM's fixed
    coefficients, which assume equal steps; on steps equal in log-sigma it is of order 2."""
    sigma_max, sigma_min = 20.0, 0.05
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20
    reference = exact_flow(x, sigma_max, sigma_min)
    errors = []
    for steps in (32, 64):
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64))
        errors.append(((SAMPLERS[sampler].fn(DENOISER, x.clone(), sigmas) - reference).norm()).item())
    assert math.log2(errors[0] / errors[1]) > minimum, errors


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_converges_to_the_data_distribution(sampler):
    """Mean and covariance error shrinks with steps and ends near the Monte-Carlo floor. First-order
    stochastic samplers converge slowest (weak order 1 with a large constant), so they get 400 steps."""
    schedule = NoiseSchedule()
    n = 20_000
    errors = []
    info = SAMPLERS[sampler]
    many = 400 if info.stochastic and info.order == 1 else 100
    for steps in (5, many):
        sigmas = build_sigmas(schedule, steps, "karras")
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=generator, dtype=torch.float64) * math.sqrt(1 + sigmas[0].item() ** 2)
        out = SAMPLERS[sampler].fn(
            DENOISER, x, sigmas, noise=lambda g=generator: torch.randn(n, 4, generator=g, dtype=torch.float64)
        )
        assert torch.isfinite(out).all()
        errors.append(max((torch.cov(out.T) - COV).abs().max().item(), (out.mean(0) - MEAN).abs().max().item()))
    # 5 standard errors of a covariance entry at n = 20,000 is about 0.03 * the largest variance.
    assert errors[1] < 0.05 * EIGENVALUES.max().item(), errors
    assert errors[1] < errors[0], errors
