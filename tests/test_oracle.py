import math

import numpy as np
import pytest
import torch

from inkwash.errors import InkwashError
from inkwash.evaluation.oracle import PRESETS, GaussianMixture, load_gmm, preset


@pytest.fixture
def mixture3d():
    """Three well-separated components in 3-D with unequal weights and stds."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0, 1.0], [1.5, 1.0, -0.5], [0.5, -2.0, 0.0]], dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    return GaussianMixture(weights, means, stds)


def test_single_component_is_gaussian_posterior_mean():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(5, generator=generator, dtype=torch.float64)
    s = 0.7
    gmm = GaussianMixture([3.0], mu[None], [s])
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2
    for sigma in [0.01, 0.5, 2.0, 30.0]:
        expected = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        torch.testing.assert_close(gmm(x, sigma), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 3.0])
def test_matches_numerical_integral_in_1d(sigma):
    weights, means, stds = [0.3, 0.7], [-1.0, 1.5], [0.3, 0.6]
    gmm = GaussianMixture(weights, [[m] for m in means], stds)
    grid = torch.linspace(-10.0, 10.0, 400_001, dtype=torch.float64)  # spacing 5e-5
    prior = sum(w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / s for w, m, s in zip(weights, means, stds, strict=True))
    xs = torch.tensor([-2.0, -0.5, 0.3, 1.0, 4.0], dtype=torch.float64)
    expected = []
    for x in xs:
        integrand = prior * torch.exp(-0.5 * ((x - grid) / sigma) ** 2)
        expected.append((grid * integrand).sum() / integrand.sum())
    got = gmm(xs[:, None], sigma)[:, 0]
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-7)


def test_sigma_zero_returns_x_exactly(mixture3d):
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    assert torch.equal(mixture3d(x, 0.0), x)
    # overlapping components: mixed responsibilities whose float sum is not exactly 1 must not leak in
    overlapping = GaussianMixture([0.2, 0.5, 0.3], [[-1.0, 0.3], [0.5, 0.1], [0.2, -0.7]], [0.8, 0.6, 0.9])
    y = torch.randn(1000, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.equal(overlapping(y, 0.0), y)
    assert torch.equal(overlapping(y.float(), torch.tensor(0.0)), y.float())
    # per-sample sigma: only the zero rows are returned unchanged
    sigma = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    out = mixture3d(x, sigma)
    zero = sigma == 0
    assert torch.equal(out[zero], x[zero])
    assert not torch.allclose(out[~zero], x[~zero])
    torch.testing.assert_close(out[~zero], mixture3d(x[~zero], sigma[~zero]))


def test_huge_sigma_returns_mixture_mean(mixture3d):
    # At sigma = 1e4 the posterior is the prior up to O(|x| |mu| / sigma^2 + s^2 |x| / sigma^2) corrections.
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(mixture3d(x * 3, 1e4), mixture3d.mean().expand(5, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixture3d(x * 1e4, 1e4), mixture3d.mean().expand(5, 3), rtol=0, atol=2e-3)
    torch.testing.assert_close(mixture3d.responsibilities(x * 3, 1e4), mixture3d.weights.expand(5, 3))


@pytest.mark.parametrize("sigma", [1e-3, 1e4])
def test_far_away_x_is_finite(mixture3d, sigma):
    x = torch.tensor([[1e3, 1e3, 1e3], [-1e3, 0.0, 1e3], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = mixture3d(x, sigma)
    assert torch.isfinite(out).all()
    assert torch.isfinite(mixture3d.log_prob(x, sigma)).all()
    resp = mixture3d.responsibilities(x, sigma)
    assert torch.isfinite(resp).all()
    torch.testing.assert_close(resp.sum(dim=1), torch.ones(3, dtype=torch.float64))
    if sigma == 1e-3:  # with tiny noise the posterior mean barely moves x
        torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_float32_image_batch_keeps_shape_and_dtype():
    generator = torch.Generator().manual_seed(3)
    gmm = GaussianMixture([0.4, 0.6], torch.randn(2, 2 * 3 * 3, generator=generator), [0.2, 0.4])
    x = torch.randn(4, 2, 3, 3, generator=generator)
    out = gmm(x, torch.full((4,), 0.5))
    assert out.shape == x.shape and out.dtype == torch.float32
    flat = gmm(x.double().reshape(4, -1), 0.5)
    torch.testing.assert_close(out.reshape(4, -1), flat.float())
    with pytest.raises(ValueError, match="D=18"):
        gmm(torch.zeros(4, 2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="sigma"):
        gmm(x, torch.ones(3))


@pytest.mark.parametrize("sigma", [0.1, 0.7, 3.0])
def test_tweedie_consistency(mixture3d, sigma):
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture3d.log_prob(x, sigma).sum(), x)
    tweedie = x.detach() + sigma**2 * grad
    torch.testing.assert_close(mixture3d(x.detach(), sigma), tweedie, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one_in_1d():
    gmm = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [0.3, 0.6])
    grid = torch.linspace(-25.0, 25.0, 250_001, dtype=torch.float64)  # tails beyond are < 1e-20
    for sigma in [0.0, 0.5, 2.0]:
        mass = gmm.log_prob(grid[:, None], sigma).exp().sum() * (50.0 / 250_000)
        assert abs(float(mass) - 1.0) < 1e-8


def test_exact_samples_match_moments_and_weights(mixture3d):
    samples, labels = mixture3d.sample(100_000, generator=torch.Generator().manual_seed(5))
    assert samples.shape == (100_000, 3) and samples.dtype == torch.float64
    assert labels.shape == (100_000,) and labels.dtype == torch.long
    torch.testing.assert_close(samples.mean(dim=0), mixture3d.mean(), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(samples.T), mixture3d.covariance(), rtol=0, atol=0.03)
    label_freq = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(label_freq, mixture3d.weights, rtol=0, atol=0.01)
    torch.testing.assert_close(mixture3d.mode_weights(samples), mixture3d.weights, rtol=0, atol=0.01)
    assert mixture3d.mode_weight_error(samples) < 0.01
    # draws from component 1 only (weight 0.5): TV distance to w is 1 - 0.5
    single = samples[labels == 1]
    assert mixture3d.mode_weight_error(single) == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(mixture3d.mode_weights(single), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_sampling_is_reproducible(mixture3d):
    a, la = mixture3d.sample(50, generator=torch.Generator().manual_seed(6))
    b, lb = mixture3d.sample(50, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize(
    ("weights", "means", "stds", "message"),
    [
        ([0.5, -0.1], [[0.0], [1.0]], [1.0, 1.0], "non-negative"),
        ([0.5, float("nan")], [[0.0], [1.0]], [1.0, 1.0], "non-negative"),
        ([0.0, 0.0], [[0.0], [1.0]], [1.0, 1.0], "all be zero"),
        ([0.5, 0.5], [[0.0], [1.0]], [1.0, 0.0], "positive"),
        ([0.5, 0.5], [[0.0], [1.0], [2.0]], [1.0, 1.0], "means"),
        ([0.5, 0.5], [0.0, 1.0], [1.0, 1.0], "means"),
        ([0.5, 0.5], [[0.0], [1.0]], [1.0], "stds"),
        ([], [[0.0]], [1.0], "weights"),
    ],
)
def test_constructor_rejects_bad_parameters(weights, means, stds, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(weights, means, stds)


def test_weights_are_normalised():
    gmm = GaussianMixture([2.0, 6.0], [[0.0], [1.0]], [1.0, 1.0])
    torch.testing.assert_close(gmm.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert gmm.weights.dtype == gmm.means.dtype == gmm.stds.dtype == torch.float64


def test_npz_round_trip(tmp_path, mixture3d):
    path = tmp_path / "mix.npz"
    mixture3d.save(path)
    loaded = load_gmm(str(path))
    for key in ("weights", "means", "stds"):
        assert torch.equal(getattr(loaded, key), getattr(mixture3d, key))
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["means", "stds", "weights"]


def test_load_gmm_errors(tmp_path):
    with pytest.raises(InkwashError, match=r"not found.*missing\.npz"):
        load_gmm(str(tmp_path / "missing.npz"))
    text = tmp_path / "notes.npz"
    text.write_text("not an archive\n")
    with pytest.raises(InkwashError, match=r"notes\.npz"):
        load_gmm(str(text))
    no_stds = tmp_path / "no_stds.npz"
    np.savez(no_stds, weights=np.ones(2), means=np.zeros((2, 3)))
    with pytest.raises(InkwashError, match=r"no_stds\.npz.*stds"):
        load_gmm(str(no_stds))
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, weights=np.ones(2), means=np.zeros((3, 4)), stds=np.ones(2))
    with pytest.raises(InkwashError, match=r"mismatched.npz.*means \[3, 4\]"):
        load_gmm(str(mismatched))
    negative = tmp_path / "negative.npz"
    np.savez(negative, weights=np.array([1.0, -1.0]), means=np.zeros((2, 4)), stds=np.ones(2))
    with pytest.raises(InkwashError, match=r"negative\.npz.*non-negative"):
        load_gmm(str(negative))
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(InkwashError, match=r"single.npy.*not an \.npz"):
        load_gmm(str(single))


def test_presets():
    assert set(PRESETS) == {"gmm2d", "gmm64", "gmm48"}
    gmm2d = load_gmm("gmm2d")
    assert (gmm2d.num_components, gmm2d.dim) == (9, 2)
    assert gmm2d.weights.max() / gmm2d.weights.min() > 2
    assert gmm2d.means.norm(dim=1).max() == pytest.approx(1.0)
    gmm64 = load_gmm("gmm64")
    assert (gmm64.num_components, gmm64.dim) == (10, 64)
    assert float(gmm64.stds.min()) >= 0.1 - 1e-12 and float(gmm64.stds.max()) <= 0.4 + 1e-12
    assert gmm64.weights.max() / gmm64.weights.min() > 5
    per_coordinate_std = gmm64.covariance().diagonal().sqrt()
    assert 0.3 < float(per_coordinate_std.mean()) < 1.0
    again = preset("gmm64")  # deterministic
    assert torch.equal(again.means, gmm64.means) and torch.equal(again.stds, gmm64.stds)
    for gmm in (gmm2d, gmm64):  # the modes are resolvable: exact samples get the right mode weights
        samples, _ = gmm.sample(20_000, generator=torch.Generator().manual_seed(7))
        assert gmm.mode_weight_error(samples) < 0.02


def test_held_out_preset_differs_from_gmm64_and_is_resolvable():
    """gmm48, the held-out check of the samplers' defaults (chosen on gmm64): another dimension, number of
    modes, weight spread and width range, deterministic, with modes that exact samples resolve."""
    gmm48, gmm64 = load_gmm("gmm48"), load_gmm("gmm64")
    assert (gmm48.num_components, gmm48.dim) == (16, 48)
    assert gmm48.dim != gmm64.dim and gmm48.num_components != gmm64.num_components
    torch.testing.assert_close(gmm48.stds.min(), torch.tensor(0.05, dtype=torch.float64))
    torch.testing.assert_close(gmm48.stds.max(), torch.tensor(0.5, dtype=torch.float64))
    assert len(gmm48.stds.unique()) == 16
    assert float(gmm48.weights.max() / gmm48.weights.min()) == pytest.approx(16.0)
    assert float(gmm48.weights.max() / gmm48.weights.min()) > 2 * float(gmm64.weights.max() / gmm64.weights.min())
    per_coordinate_std = gmm48.covariance().diagonal().sqrt()
    assert 0.3 < float(per_coordinate_std.mean()) < 1.0
    separation = torch.cdist(gmm48.means, gmm48.means) + torch.eye(16, dtype=torch.float64) * 1e9
    assert float(separation.min()) > 3.0
    again = preset("gmm48")  # deterministic
    for key in ("weights", "means", "stds"):
        assert torch.equal(getattr(again, key), getattr(gmm48, key))
    samples, labels = gmm48.sample(20_000, generator=torch.Generator().manual_seed(7))
    assert gmm48.mode_weight_error(samples) < 0.02
    assert torch.equal(gmm48.responsibilities(samples).argmax(dim=1), labels)  # every exact sample's own mode


def test_unknown_preset():
    with pytest.raises(InkwashError, match=r"gmm2d.*gmm48.*gmm64"):
        preset("gmm3d")
    with pytest.raises(InkwashError, match="presets are: gmm2d, gmm48, gmm64"):
        load_gmm("gmm3d")


def test_gaussian_log_prob_closed_form():
    gmm = GaussianMixture([1.0], [[0.5, -0.5]], [0.4])
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    sigma = 0.3
    var = 0.4**2 + sigma**2
    expected = -math.log(2 * math.pi * var) - ((x - torch.tensor([0.5, -0.5])) ** 2).sum(1) / (2 * var)
    torch.testing.assert_close(gmm.log_prob(x, sigma), expected)


def test_ode_solution_matches_the_closed_form_flow_of_a_gaussian():
    # For N(mu, s^2 I) the probability-flow ODE is linear: x(sigma) - mu scales as sqrt(s^2 + sigma^2).
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 8, generator=generator, dtype=torch.float64)
    gaussian = GaussianMixture([1.0], mu, [0.3])
    for sigma_start in (0.5, 80.0):
        x = mu + math.sqrt(0.09 + sigma_start**2) * torch.randn(64, 8, generator=generator, dtype=torch.float64)
        exact = mu + (x - mu) * 0.3 / math.sqrt(0.09 + sigma_start**2)
        solved = gaussian.ode_solution(x, sigma_start)
        assert (solved - exact).abs().max() < 1e-7 * (exact - mu).abs().max()
        coarse = gaussian.ode_solution(x, sigma_start, steps=5)
        assert (coarse - exact).abs().max() > 1e-7 * (exact - mu).abs().max()  # the check can fail


def test_ode_solution_carries_the_noised_marginal_to_the_data():
    gmm = preset("gmm2d")
    x0, _ = gmm.sample(4000, torch.Generator().manual_seed(1))
    noised = x0 + 20.0 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert gmm.mode_weight_error(gmm.ode_solution(noised, 20.0, steps=50)) < 0.03
    with pytest.raises(ValueError, match="sigma_start"):
        gmm.ode_solution(noised, 0.0)
