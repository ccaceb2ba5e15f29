"""Mixed precision, shared by training and sampling: the names, the autocast context, and a warning
where the CPU has no kernels for the chosen type."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for bf16 / fp16 (mixed precision: weights and everything outside the network's
    convolutions and matrix products stay fp32); nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])


def precision_warning(precision: str, device: torch.device) -> str | None:
    """bf16 (fp16) on a CPU without bf16 (fp16) kernels, such as AVX-512 BF16 / AMX, falls back to slow
    convolutions."""
    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    mkldnn = torch.ops.mkldnn
    supported = mkldnn._is_mkldnn_bf16_supported() if precision == "bf16" else mkldnn._is_mkldnn_fp16_supported()
    if supported:
        return None
    kernels = "AVX-512 BF16 or AMX" if precision == "bf16" else "AVX-512 FP16 or AMX-FP16"
    return (
        f"warning: this CPU has no {precision} convolution kernels (no {kernels}); "
        f"--precision {precision} will be many times slower than fp32 here"
    )
