import torch

from inkwash.denoiser import EpsDenoiser
from inkwash.schedule import NoiseSchedule


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
    denoised = EpsDenoiser(net, schedule)(x, sigma)
    # The network sees exactly the DDPM input x_t and the integer timestep.
    assert torch.allclose(net.seen[0], x_t_vp, atol=1e-10)
    assert torch.allclose(net.seen[1].double(), t.double(), atol=1e-4)
    # A perfect eps prediction recovers x0.
    assert torch.allclose(denoised, x0, atol=1e-10)


def test_fractional_sigma_gives_fractional_timestep():
    schedule = NoiseSchedule()
    net = RecordingEps(torch.zeros(1, 1, 2, 2))
    sigma = schedule.t_to_sigma(torch.tensor([100.5]))
    EpsDenoiser(net, schedule)(torch.zeros(1, 1, 2, 2), sigma)
    assert abs(net.seen[1].item() - 100.5) < 1e-4
