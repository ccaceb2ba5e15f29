"""The FID Inception-v3 of pytorch-fid: 2048-d pool3 features from the TF-ported 2015-12-05 weights.

This is Szegedy et al. 2016's Inception-v3 as TensorFlow's 2015-12-05 graph computes it, which is what
Heusel et al. 2017 used for FID and what pytorch-fid reproduces. It differs from the ImageNet network of
torchvision in four places: a 1008-way classifier, average pools in the Mixed_5/6/7b blocks that
divide by the number of real (not padded) pixels, and a max pool instead of an average pool in the
last block's pool branch. Every convolution is Conv-BN-ReLU without a conv bias, BatchNorm eps 0.001.

The state-dict names are those of pytorch-fid's ``FIDInception*`` modules (``Mixed_5b.branch1x1.conv.
weight``, ...), so its ``pt_inception-2015-12-05-6726825d.pth`` converts one to one. inkwash downloads
nothing and never unpickles: ``convert_weights`` reads the .pth with ``torch.load(weights_only=True)``
once and writes safetensors, which ``load_inception`` reads with strict name and shape checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from inkwash.checkpoint import load_tensors
from inkwash.core.precision import full_fp32
from inkwash.data.cache import cache_root
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes

WEIGHTS_NAME = "pt_inception-2015-12-05.safetensors"
WEIGHTS_ENV = "INKWASH_INCEPTION_WEIGHTS"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
_OPTIONAL = "num_batches_tracked"  # BatchNorm's step counter: unused in eval mode, absent from old .pth files


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU, named ``conv`` and ``bn`` as in pytorch-fid."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the pixels inside the image, hence count_include_pad=False.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches; 224 + pool_features out."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class ReductionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): strided 3x3, strided double 3x3 and a max pool; 384 + 96 + in out."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, 3, stride=2)], dim=1)


class MixedC(nn.Module):
    """17x17 block (Mixed_6b-e): factorised 7x7 branches of width ``channels_7x7``; 768 out."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class ReductionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): strided 3x3, strided 7x7-then-3x3 and a max pool; 320 + 192 + in out."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, 3, stride=2)], dim=1)


class MixedE(nn.Module):
    """8x8 block (Mixed_7b/c): split 1x3 / 3x1 branches; 2048 out. The pool branch averages (Mixed_7b)
    or, in the 2015-12-05 graph's last block (Mixed_7c), takes the maximum."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(stem), self.branch3x3_2b(stem)], dim=1)
        stem = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(stem), self.branch3x3dbl_3b(stem)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID papers; ``features`` maps images in [-1, 1] to pool3 features (N, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # ImageNet logits of the 2015 graph; unused by FID

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048), the spatial mean of Mixed_7c."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # (N, 768, 17, 17) after Mixed_6a
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a):
            x = block(x)  # (N, 1280, 8, 8) after Mixed_7a
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 1 or 3, H, W) in [-1, 1] -> (N, 2048) on the CPU, preprocessed as pytorch-fid does.

        pytorch-fid resizes [0, 1] images bilinearly (align_corners=False, no antialiasing) to 299 and
        then maps them to [-1, 1]; both steps are affine per pixel, so resizing [-1, 1] images is the same.
        """
        device = self.fc.weight.device
        x = images.to(device=device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W): grayscale as three equal channels
        if x.shape[1] != 3:
            raise InkwashError(f"Inception features need 1 or 3 channels, got {x.shape[1]}")
        with full_fp32():  # cuDNN would otherwise convolve in TF32 on a GPU, off the reference graph
            if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            return self.pool3(x).cpu()


def weights_path(path: str | Path | None = None) -> Path:
    """``path`` if given, else $INKWASH_INCEPTION_WEIGHTS, else the cache directory's pt_inception file."""
    chosen = path or os.environ.get(WEIGHTS_ENV) or cache_root() / WEIGHTS_NAME
    return Path(chosen).expanduser()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor a weights file must hold, with its shape (BatchNorm's step counter is optional)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        network = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in network.state_dict().items() if not k.endswith(_OPTIONAL)}


def missing_weights_message(path: Path) -> str:
    return (
        f"Inception weights not found: {path}. Download pytorch-fid's {PYTORCH_FID_URL} and convert it once "
        'with: python -c "from inkwash.evaluation.inception import convert_weights; '
        f"convert_weights('pt_inception-2015-12-05-6726825d.pth', '{path}')\" (or pass --inception-weights PATH "
        f"/ set {WEIGHTS_ENV})"
    )


def check_tensors(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise a one-line InkwashError unless the names and shapes are exactly the FID Inception's."""
    expected = expected_shapes()
    given = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(_OPTIONAL)}
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or unexpected:
        detail = "; ".join(
            f"{label} {len(names)} (e.g. {names[0]})"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise InkwashError(f"{source} is not the FID Inception-v3: {detail}")
    wrong = [name for name in sorted(expected) if given[name] != expected[name]]
    if wrong:
        name = wrong[0]
        raise InkwashError(
            f"{source} is not the FID Inception-v3: {len(wrong)} tensor(s) of the wrong shape, e.g. {name} "
            f"is {list(given[name])}, expected {list(expected[name])}"
        )
    bad = [name for name, tensor in tensors.items() if not tensor.is_floating_point() and name in expected]
    if bad:
        raise InkwashError(f"{source}: {bad[0]} is {tensors[bad[0]].dtype}, expected floating point")


def load_inception(path: str | Path | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 with weights from a safetensors file (see ``weights_path``), in eval mode."""
    path = weights_path(path)
    if not path.is_file():
        raise InkwashError(missing_weights_message(path))
    tensors = load_tensors(path)
    check_tensors(tensors, path)
    with torch.device("meta"):  # the file supplies every tensor, so skip the random initialisation
        network = FIDInceptionV3()
    state = {name: tensor.float() for name, tensor in tensors.items() if not name.endswith(_OPTIONAL)}
    for name in network.state_dict():
        if name.endswith(_OPTIONAL):
            state[name] = torch.zeros((), dtype=torch.long)
    network.load_state_dict(state, strict=True, assign=True)
    return network.eval()


def convert_weights(pth_path: str | Path, out_path: str | Path) -> Path:
    """Convert pytorch-fid's ``pt_inception-2015-12-05-*.pth`` to safetensors, checked, written atomically.

    The .pth is read with ``torch.load(weights_only=True)``, which restores tensors only and runs no code.
    """
    pth_path, out_path = Path(pth_path).expanduser(), Path(out_path).expanduser()
    if not pth_path.is_file():
        raise InkwashError(f"pytorch-fid weights not found: {pth_path}")
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a safe tensor pickle
        raise InkwashError(f"cannot read {pth_path} as a state dict: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InkwashError(f"{pth_path} does not hold a state dict of tensors")
    tensors = {k: v.contiguous() for k, v in state.items() if not k.endswith(_OPTIONAL)}
    check_tensors(tensors, pth_path)
    atomic_write_bytes(out_path, save({k: v.float() for k, v in tensors.items()}))
    return out_path
