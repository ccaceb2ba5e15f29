import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from inkwash.checkpoint import load_tensors
from inkwash.errors import InkwashError
from inkwash.evaluation.features import get_extractor, weights_hash
from inkwash.evaluation.inception import (
    WEIGHTS_ENV,
    FIDInceptionV3,
    MixedA,
    MixedE,
    convert_weights,
    expected_shapes,
    load_inception,
    weights_path,
)


def conv(name, c_in, c_out, kh, kw=None):
    return [(name, c_in, c_out, kh, kw or kh)]


def block_a(name, c_in, pool):
    return [
        (f"{name}.branch1x1", c_in, 64, 1, 1),
        (f"{name}.branch5x5_1", c_in, 48, 1, 1),
        (f"{name}.branch5x5_2", 48, 64, 5, 5),
        (f"{name}.branch3x3dbl_1", c_in, 64, 1, 1),
        (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{name}.branch_pool", c_in, pool, 1, 1),
    ]


def block_c(name, c7):
    return [
        (f"{name}.branch1x1", 768, 192, 1, 1),
        (f"{name}.branch7x7_1", 768, c7, 1, 1),
        (f"{name}.branch7x7_2", c7, c7, 1, 7),
        (f"{name}.branch7x7_3", c7, 192, 7, 1),
        (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
        (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
        (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
        (f"{name}.branch_pool", 768, 192, 1, 1),
    ]


def block_e(name, c_in):
    return [
        (f"{name}.branch1x1", c_in, 320, 1, 1),
        (f"{name}.branch3x3_1", c_in, 384, 1, 1),
        (f"{name}.branch3x3_2a", 384, 384, 1, 3),
        (f"{name}.branch3x3_2b", 384, 384, 3, 1),
        (f"{name}.branch3x3dbl_1", c_in, 448, 1, 1),
        (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
        (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{name}.branch_pool", c_in, 192, 1, 1),
    ]


# Inception-v3 (Szegedy et al. 2016, Table 1 and Figs. 5-7) as laid out in pytorch-fid, written out by hand.
LAYOUT = [
    *conv("Conv2d_1a_3x3", 3, 32, 3),
    *conv("Conv2d_2a_3x3", 32, 32, 3),
    *conv("Conv2d_2b_3x3", 32, 64, 3),
    *conv("Conv2d_3b_1x1", 64, 80, 1),
    *conv("Conv2d_4a_3x3", 80, 192, 3),
    *block_a("Mixed_5b", 192, 32),
    *block_a("Mixed_5c", 256, 64),
    *block_a("Mixed_5d", 288, 64),
    *conv("Mixed_6a.branch3x3", 288, 384, 3),
    *conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
    *conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3),
    *conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3),
    *block_c("Mixed_6b", 128),
    *block_c("Mixed_6c", 160),
    *block_c("Mixed_6d", 160),
    *block_c("Mixed_6e", 192),
    *conv("Mixed_7a.branch3x3_1", 768, 192, 1),
    *conv("Mixed_7a.branch3x3_2", 192, 320, 3),
    *conv("Mixed_7a.branch7x7x3_1", 768, 192, 1),
    *conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    *conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    *conv("Mixed_7a.branch7x7x3_4", 192, 192, 3),
    *block_e("Mixed_7b", 1280),
    *block_e("Mixed_7c", 2048),
]


def layout_shapes():
    shapes = {}
    for name, c_in, c_out, kh, kw in LAYOUT:
        shapes[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{stat}"] = (c_out,)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def random_state(seed=0):
    """Tensors for every key, scaled so that 94 Conv-BN-ReLU layers keep finite activations."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes().items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("conv.weight"):
            state[name] = noise * math.sqrt(2 / math.prod(shape[1:]))  # He initialisation
        elif name.endswith("bn.weight"):
            state[name] = 1 + 0.1 * noise
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=generator)
        else:
            state[name] = 0.1 * noise
    return state


def test_state_dict_matches_the_published_layout():
    shapes = expected_shapes()
    assert shapes == layout_shapes()  # every name and shape, nothing else
    assert len(shapes) == 94 * 5 + 2
    # torchvision's inception_v3 has 27,161,264 parameters with its auxiliary head (conv 768->128 1x1,
    # conv 128->768 5x5, each with BN scale and shift, and a 768->1000 fc) and a 1000-way classifier;
    # the FID network has no auxiliary head and 1008 classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    published = 27_161_264 - aux + 8 * (2048 + 1)
    network = FIDInceptionV3()
    assert sum(p.numel() for p in network.parameters()) == published == 23_850_960
    assert (network.fc.in_features, network.fc.out_features) == (2048, 1008)
    assert all(m.eps == 0.001 for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    assert not network.Mixed_7b.max_pool and network.Mixed_7c.max_pool


def identity_pool_branch(branch, channels):
    with torch.no_grad():
        branch.conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
        # BN is exactly the identity when running_var + eps == 1. PyTorch 2.11 refuses eps == 0, so use
        # powers of two, whose sum is exact in float32.
        branch.bn.eps = 2.0**-10
        branch.bn.running_var.fill_(1.0 - 2.0**-10)


def test_pool_branches_are_the_2015_graph_variants():
    # Mixed_5-7b average without counting the zero padding: a constant image stays constant at the corners.
    block = MixedA(8, pool_features=8).eval()
    identity_pool_branch(block.branch_pool, 8)
    with torch.no_grad():
        pooled = block(torch.full((1, 8, 5, 5), 2.0))[:, -8:]  # (1, 8, 5, 5)
    assert torch.allclose(pooled, torch.full_like(pooled, 2.0))
    # Mixed_7c's pool branch is a 3x3 max: a single spike fills its 3x3 neighbourhood at full height.
    spike = torch.zeros(1, 192, 6, 6)
    spike[..., 2, 3] = 9.0
    for max_pool, expected in ((True, 9.0), (False, 1.0)):
        block = MixedE(192, max_pool=max_pool).eval()
        identity_pool_branch(block.branch_pool, 192)
        with torch.no_grad():
            pooled = block(spike)[:, -192:]  # (1, 192, 6, 6)
        assert torch.allclose(pooled[..., 1:4, 2:5], torch.full((1, 192, 3, 3), expected))
        assert pooled[..., 4:, :].abs().max() == 0 and pooled[..., :, :2].abs().max() == 0


def test_preprocessing_is_pytorch_fids(monkeypatch):
    network = FIDInceptionV3()
    seen = []

    def record(x):
        seen.append(x)
        return x.mean(dim=(2, 3))

    monkeypatch.setattr(network, "pool3", record)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    network.features(images)
    x = seen[0]
    assert x.shape == (2, 3, 299, 299) and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # pytorch-fid: [0, 1] images resized bilinearly (no antialiasing), then 2 x - 1.
    zero_one = (images + 1) / 2
    fid_input = 2 * F.interpolate(zero_one, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(x[:, :1], fid_input, atol=1e-6)
    network.features(torch.full((1, 3, 299, 299), -1.0))
    assert torch.equal(seen[1], torch.full((1, 3, 299, 299), -1.0))  # already 299: passed through untouched
    with pytest.raises(InkwashError, match="1 or 3 channels"):
        network.features(torch.zeros(1, 2, 16, 16))


def test_features_are_computed_without_tf32(monkeypatch):
    """cuDNN convolves in TF32 by default on recent GPUs; FID features must be IEEE fp32 throughout."""
    network = FIDInceptionV3()
    seen = []

    def record(x):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return x.mean(dim=(2, 3))

    monkeypatch.setattr(network, "pool3", record)
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    network.features(torch.zeros(1, 1, 16, 16))
    assert seen == [("ieee", "ieee")]
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_random_weights_round_trip_to_2048_features(tmp_path):
    state = random_state()
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    extractor = get_extractor("inception", inception_weights=path)
    loaded = extractor.network.state_dict()
    assert all(torch.equal(loaded[name].cpu(), tensor) for name, tensor in state.items())  # cuda when present
    assert all(t.dtype == torch.float32 for t in extractor.network.parameters())
    assert extractor.identity == f"inception-fid:{weights_hash(extractor.network)}"
    shapes = {}

    def record_shape(module, args, out):
        shapes[module.name] = tuple(out.shape)

    for name in ("Mixed_5d", "Mixed_6a", "Mixed_7a", "Mixed_7c"):
        block = getattr(extractor.network, name)
        block.name = name
        block.register_forward_hook(record_shape)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = extractor(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()  # means of ReLU outputs
    assert not np.allclose(features[0], features[1])
    assert shapes == {
        "Mixed_5d": (2, 288, 35, 35),
        "Mixed_6a": (2, 768, 17, 17),
        "Mixed_7a": (2, 1280, 8, 8),
        "Mixed_7c": (2, 2048, 8, 8),
    }


def test_weights_path_order(tmp_path, monkeypatch):
    monkeypatch.setenv("INKWASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert weights_path() == tmp_path / "cache" / "pt_inception-2015-12-05.safetensors"
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env.safetensors"))
    assert weights_path() == tmp_path / "env.safetensors"
    assert weights_path(tmp_path / "given.safetensors") == tmp_path / "given.safetensors"


def test_a_missing_file_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("INKWASH_CACHE", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InkwashError) as error:
        get_extractor("inception")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "pt_inception-2015-12-05.safetensors") in message
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "convert_weights(" in message
    assert "--inception-weights" in message and WEIGHTS_ENV in message


def test_wrong_files_are_one_line_errors(tmp_path):
    state = {name: torch.zeros(shape) for name, shape in expected_shapes().items()}
    state["Mixed_6c.branch7x7_2.conv.weight"] = torch.zeros(160, 160, 7, 1)  # transposed kernel
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InkwashError, match=r"wrong shape.*Mixed_6c\.branch7x7_2\.conv\.weight is \[160, 160, 7, 1\]"):
        load_inception(tmp_path / "shape.safetensors")
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "keys.safetensors"))
    with pytest.raises(InkwashError, match=r"missing 1 \(e\.g\. Mixed_6c.*unexpected 1 \(e\.g\. AuxLogits"):
        load_inception(tmp_path / "keys.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InkwashError, match="cannot read"):
        load_inception(tmp_path / "junk.safetensors")


def test_converter_round_trips_a_pytorch_fid_style_pth(tmp_path):
    state = random_state(seed=2)
    saved = dict(state)
    saved["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # present in newer PyTorch's files
    torch.save(saved, tmp_path / "pt_inception.pth")
    out = convert_weights(tmp_path / "pt_inception.pth", tmp_path / "sub" / "inception.safetensors")
    converted = load_tensors(out)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[name], tensor) for name, tensor in state.items())
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temporary file left behind


class Payload:
    """Unpickling this would create ``marker``: the converter must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_converter_runs_no_code_and_rejects_non_state_dicts(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"fc.weight": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(InkwashError, match="cannot read"):
        convert_weights(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert not marker.exists()
    torch.save({"fc.weight": torch.zeros(1008, 2048), "note": "text"}, tmp_path / "mixed.pth")
    with pytest.raises(InkwashError, match="state dict of tensors"):
        convert_weights(tmp_path / "mixed.pth", tmp_path / "out.safetensors")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(InkwashError, match="missing"):
        convert_weights(tmp_path / "partial.pth", tmp_path / "out.safetensors")
    with pytest.raises(InkwashError, match="not found"):
        convert_weights(tmp_path / "absent.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
