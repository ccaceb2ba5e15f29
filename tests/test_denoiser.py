import pytest
import torch

from inkwash.core.denoiser import ModelDenoiser, PlacedDenoiser
from inkwash.core.precision import PRECISIONS
from inkwash.core.schedule import NoiseSchedule


class RecordingEps(torch.nn.Module):
    """A fake epsilon network that returns a fixed eps and records what it was given."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.seen = None

    def forward(self, x, t, cond=None):
        self.seen = (x.clone(), t.clone())
        return self.eps


def test_eps_wrapper_matches_the_vp_forward_process():
    schedule = NoiseSchedule()
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 250, 999])
    x_t_vp = schedule.q_sample(x0, t, eps)
    sigma = schedule.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # the denoiser's convention
    net = RecordingEps(eps)
    denoised = ModelDenoiser(net, schedule)(x, sigma)
    # The network sees exactly the DDPM input x_t and the integer timestep.
    assert torch.allclose(net.seen[0], x_t_vp, atol=1e-10)
    assert torch.allclose(net.seen[1].double(), t.double(), atol=1e-4)
    # A perfect eps prediction recovers x0.
    assert torch.allclose(denoised, x0, atol=1e-10)


def test_fractional_sigma_gives_fractional_timestep():
    schedule = NoiseSchedule()
    net = RecordingEps(torch.zeros(1, 1, 2, 2))
    sigma = schedule.t_to_sigma(torch.tensor([100.5]))
    ModelDenoiser(net, schedule)(torch.zeros(1, 1, 2, 2), sigma)
    assert abs(net.seen[1].item() - 100.5) < 1e-4


class Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, cond=None):
        return self.out


def test_x0_and_v_predictions_recover_x0():
    import pytest

    from inkwash.core.denoiser import ModelDenoiser

    schedule = NoiseSchedule()
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([3, 400, 999])
    sigma = schedule.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    alpha_bar = schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    assert torch.allclose(ModelDenoiser(Fixed(x0), schedule, "x0")(x, sigma), x0, atol=1e-12)
    assert torch.allclose(ModelDenoiser(Fixed(v), schedule, "v")(x, sigma), x0, atol=1e-9)
    assert torch.allclose(ModelDenoiser(Fixed(eps), schedule, "eps")(x, sigma), x0, atol=1e-9)
    with pytest.raises(ValueError, match="prediction"):
        ModelDenoiser(Fixed(x0), schedule, "score")


class ConvEps(torch.nn.Module):
    """A one-convolution epsilon network that records the dtype its convolution computed in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.computed_in = None

    def forward(self, x, t, cond=None):
        out = self.conv(x)
        self.computed_in = out.dtype
        return out


def test_placed_denoiser_in_fp32_is_the_denoiser_itself():
    denoiser = ModelDenoiser(ConvEps(), NoiseSchedule())
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    placed = PlacedDenoiser(denoiser, "cpu", "fp32")
    out = placed(x, torch.tensor(2.0))
    assert out.dtype == torch.float64 and out.device == x.device
    assert torch.equal(out, denoiser(x, torch.tensor(2.0)))
    assert denoiser.network.computed_in == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_placed_denoiser_autocasts_only_the_network(precision):
    denoiser = ModelDenoiser(ConvEps(), NoiseSchedule())
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0, 8.0])
    exact = denoiser(x, sigma)
    out = PlacedDenoiser(denoiser, "cpu", precision)(x, sigma)
    assert denoiser.network.computed_in == PRECISIONS[precision]
    assert out.dtype == torch.float32  # handed back in the input's dtype
    # The network's output (eps = (x - D) / sigma) carries the low precision's rounding, 8 or 11
    # mantissa bits; the wrapper adds nothing beyond it.
    scale = sigma.reshape(-1, 1, 1, 1)
    eps_exact, eps_low = (x - exact) / scale, (x - out) / scale
    unit = 2.0**-8 if precision == "bf16" else 2.0**-11
    assert (eps_low - eps_exact).abs().max() <= 4 * unit * eps_exact.abs().max()
    assert not torch.equal(out, exact)


def test_placed_denoiser_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        PlacedDenoiser(ModelDenoiser(ConvEps(), NoiseSchedule()), "cpu", "fp8")
