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
