import pytest
import torch

from inkwash.precision import PRECISIONS, precision_context, precision_warning


def test_fp32_is_no_autocast_and_the_others_autocast_to_their_dtype():
    conv = torch.nn.Conv2d(1, 1, 3)
    x = torch.randn(1, 1, 5, 5)
    with precision_context("fp32", "cpu"):
        assert conv(x).dtype == torch.float32
    for name in ("bf16", "fp16"):
        with precision_context(name, torch.device("cpu")):
            assert conv(x).dtype == PRECISIONS[name]
            assert (x + 1).dtype == torch.float32  # element-wise arithmetic is untouched


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        precision_context("fp8", "cpu")


def test_warning_only_for_low_precision_on_a_cpu_without_its_kernels():
    cpu = torch.device("cpu")
    assert precision_warning("fp32", cpu) is None
    assert precision_warning("bf16", torch.device("cuda")) is None
    has_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    warning = precision_warning("bf16", cpu)
    assert (warning is None) == has_bf16
    if warning is not None:
        assert "no bf16 convolution kernels" in warning and "--precision bf16" in warning
