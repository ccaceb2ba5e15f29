import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and for the CLI subprocesses it starts): on a 2-core machine two
    # workers of two threads each oversubscribe the cores and run several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# "auto" precision picks bf16 on CPUs with bf16 instructions and fp32 elsewhere; the suite's numerical
# checks are written for fp32, so that they hold on every machine. tests/test_precision.py checks auto itself.
os.environ.setdefault("INKWASH_PRECISION", "fp32")

from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.unet import UNet, preset


class GaussianDenoiser:
    """The exact denoiser E[x0 | x0 + sigma * eps = x] of Gaussian data N(mean, cov)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        self.mean = mean.double()  # (D,)
        self.cov = cov.double()  # (D, D)
        self.dim = mean.numel()

    def __call__(self, x, sigma, cond=None):
        shape = x.shape
        flat = x.reshape(shape[0], -1).double()  # (B, D)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(shape[0])
        eye = torch.eye(self.dim, dtype=torch.float64)
        out = torch.empty_like(flat)
        for value in sigma.unique():
            rows = sigma == value
            gain = self.cov @ torch.linalg.inv(self.cov + value**2 * eye)  # (D, D)
            out[rows] = self.mean + (flat[rows] - self.mean) @ gain.T
        return out.to(x.dtype).reshape(shape)


@pytest.fixture
def gaussian_data():
    generator = torch.Generator().manual_seed(1234)
    dim = 4
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * 0.4
    cov = a @ a.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    mean = torch.randn(dim, generator=generator, dtype=torch.float64) * 0.5
    return mean, cov, GaussianDenoiser(mean, cov)


def random_tiny_unet(num_classes: int = 0) -> UNet:
    """A tiny UNet with randomised output layers, so that its output (and its class dependence) is not zero."""
    torch.manual_seed(0)
    model = UNet(preset("tiny", num_classes=num_classes))
    with torch.no_grad():
        for p in model.out_conv.parameters():
            p.normal_(0, 0.05)
        for block in model.modules():
            if hasattr(block, "conv2"):
                block.conv2.weight.normal_(0, 0.02)
    return model.eval()


def save_random_run(path, class_names=None):
    """``random_tiny_unet`` saved as a checkpoint folder (model and EMA alike)."""
    from inkwash.checkpoint import save_checkpoint
    from inkwash.core.schedule import ScheduleConfig

    model = random_tiny_unet(len(class_names or []))
    config = {
        "unet": model.config.to_dict(),
        "schedule": ScheduleConfig().to_dict(),
        "prediction": "eps",
        "data": {"source": "test", "shape": [1, 16, 16], "num_images": 0, "class_names": class_names},
        "step": 0,
    }
    save_checkpoint(path, config, model, model)
    return path


@pytest.fixture
def tiny_denoiser():
    """A tiny UNet with a randomised (non-zero) output layer, wrapped as a denoiser."""
    return ModelDenoiser(random_tiny_unet(), NoiseSchedule())


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """A cache directory holding the trained digits feature classifier (about 10 s of training).

    Under xdist it is shared by the workers of one run: the first trains it under a file lock, the
    others wait and read it. Never shared between runs, so every run trains and checks it afresh.
    """
    from filelock import FileLock

    from inkwash.evaluation.features import digits_classifier

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "inkwash-cache"
    with FileLock(f"{root}.lock"):
        digits_classifier(root)
    return root
