import pytest
import torch

from inkwash.core.unet import PRESETS, UNet, UNetConfig, count_parameters, preset


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_for_every_preset(name, batch):
    config = PRESETS[name]
    model = UNet(config).eval()
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        out = model(x, torch.rand(batch) * 999)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_output_depends_on_input_and_time_once_trained_layers_are_nonzero():
    torch.manual_seed(0)
    model = UNet(preset("tiny")).eval()
    torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    for module in model.modules():
        if hasattr(module, "conv2"):
            torch.nn.init.normal_(module.conv2.weight, std=0.05)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]))
        b = model(x, torch.tensor([900.0, 900.0]))
        c = model(x.flip(-1), torch.tensor([10.0, 10.0]))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_class_conditioning_and_null_class():
    model = UNet(preset("tiny", num_classes=10)).eval()
    torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    for module in model.modules():
        if hasattr(module, "conv2"):
            torch.nn.init.normal_(module.conv2.weight, std=0.05)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([5.0, 5.0])
    with torch.no_grad():
        a = model(x, t, torch.tensor([1, 2]))
        b = model(x, t, None)
    assert a.shape == b.shape == x.shape
    assert not torch.allclose(a, b)


def test_rgb_and_custom_size():
    config = preset("rgb32", image_size=64)
    model = UNet(config)
    assert model(torch.randn(2, 3, 64, 64), torch.zeros(2)).shape == (2, 3, 64, 64)
    assert count_parameters(model) > 1_000_000


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNetConfig.from_dict({"image_size": 16, "bogus": 1})


def test_config_round_trip():
    config = PRESETS["digits"]
    assert UNetConfig.from_dict(config.to_dict()) == config


def test_patch_size_runs_the_network_on_a_coarser_grid():
    config = preset("digits")  # the digits preset is patched
    assert config.patch_size == 2 and config.grid_size == 8
    model = UNet(config).eval()
    assert model.input_conv.in_channels == 4 and model.out_conv.out_channels == 4
    # attention_resolutions count grid positions: (8,) is the first level, whose width is base_channels
    attention = [m for n, m in model.named_modules() if type(m).__name__ == "Attention" and n != "mid_attn"]
    assert len(attention) == 3 and {a.norm.num_channels for a in attention} == {config.base_channels}
    seen = []
    model.input_conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = model(x, torch.rand(3) * 999)
    assert seen == [(3, 32, 8, 8)]
    assert out.shape == x.shape
    # same widths and levels as the unpatched network: only the first and last convolutions grow
    plain = UNet(preset("digits", patch_size=1, attention_resolutions=(16,)))
    assert count_parameters(model) - count_parameters(plain) == 3 * 9 * 32 + 3 * (9 * 32 + 1)


def test_patch_output_is_folded_back_pixel_for_pixel():
    # an output conv that copies channel k of the last features to output channel k shows where each
    # of the P*P outputs of a grid position lands: channel k is pixel (k // P, k % P) of its block
    torch.manual_seed(0)
    model = UNet(preset("tiny", patch_size=2)).eval()
    captured = []
    model.out_norm.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        model.out_conv.weight.zero_()
        model.out_conv.bias.copy_(torch.arange(4.0))
        out = model(torch.randn(1, 1, 16, 16), torch.zeros(1))
    assert captured[0].shape[-1] == 8
    expected = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat(8, 8)
    assert torch.equal(out[0, 0], expected)


def test_bad_patch_sizes():
    with pytest.raises(ValueError, match="patch size 3 must be positive and divide the image size 16"):
        UNetConfig(image_size=16, patch_size=3)
    with pytest.raises(ValueError, match=r"divisible by 32 .* at patch size 8"):
        UNetConfig(image_size=16, patch_size=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="patch size 0"):
        UNetConfig(image_size=16, patch_size=0)
    assert UNetConfig.from_dict({"image_size": 16}).patch_size == 1  # configs saved before the option


def test_compiled_training_gradients_match_eager_under_bf16_autocast():
    """torch.compile of the network gives every parameter the gradient that eager gives it, in the bf16
    autocast that ``--precision auto`` picks on CPUs with native bf16. With ``F.interpolate`` in the
    upsampling, inductor (PyTorch 2.13, CPU) read the gradient below each upsampling before writing it:
    82 of this network's 128 parameters got a zero gradient (cosine 0.69 to eager) and ``--compile``
    trained half a network."""
    torch.manual_seed(0)
    model = UNet(preset("tiny")).train()
    with torch.no_grad():  # no zero-initialized layers, so that every gradient is non-zero
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    x, t = torch.randn(4, 1, 16, 16), torch.rand(4) * 999
    weights = torch.rand(x.shape)

    def gradients(network):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = network(x, t)
        (out.float() * weights).sum().backward()
        return [parameter.grad.clone() for parameter in model.parameters()]

    eager, compiled = gradients(model), gradients(torch.compile(model))
    names = [name for name, _ in model.named_parameters()]
    # A convolution's bias just before a GroupNorm has a gradient of zero up to rounding, so each
    # parameter is compared with an allowance of a thousandth of the largest gradient.
    floor = 1e-3 * max(e.norm() for e in eager)
    assert [n for n, e, c in zip(names, eager, compiled, strict=True) if e.norm() > floor and c.norm() == 0] == []
    for name, e, c in zip(names, eager, compiled, strict=True):
        assert (c - e).norm() <= 0.05 * e.norm() + floor, name  # bf16 rounding differs between the two, no more
