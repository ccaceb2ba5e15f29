"""Mixed precision, shared by training and sampling: the names, the autocast context, and a warning
where the CPU has no kernels for the chosen type."""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What the options accept: "auto" is bf16 where the CPU has native bf16 instructions, else fp32.
PRECISION_CHOICES = ("auto", *PRECISIONS)
# INKWASH_PRECISION=fp32 (or bf16, fp16) decides what "auto" means, e.g. to compare machines in fp32.
AUTO_ENV = "INKWASH_PRECISION"


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), which make bf16 convolutions and
    matrix products faster than fp32; without them PyTorch falls back to slow kernels (8x slower on an
    AVX2-only EPYC)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in checks if hasattr(torch.cpu, name))
    except (RuntimeError, AttributeError):  # an unusual build: fall back to the kernel library's answer
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision of an option: "auto" is bf16 on a CPU with native bf16 (measured 1.3x to 1.5x
    faster for training and sampling there) and fp32 elsewhere, GPUs included (on an H200, bf16 autocast
    ran these small networks at 0.68x the speed of fp32: the run is bound by kernel launches, and autocast
    adds casts). ``INKWASH_PRECISION`` overrides what "auto" picks."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
        return precision
    forced = os.environ.get(AUTO_ENV)
    if forced:
        if forced not in PRECISIONS:
            raise ValueError(f"{AUTO_ENV} must be one of {', '.join(PRECISIONS)}, got {forced!r}")
        return forced
    return "bf16" if torch.device(device).type == "cpu" and native_bf16_cpu() else "fp32"


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for bf16 / fp16 (mixed precision: weights and everything outside the network's
    convolutions and matrix products stay fp32); nothing for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])


def precision_warning(precision: str, device: torch.device) -> str | None:
    """bf16 (fp16) on a CPU without bf16 (fp16) kernels, such as AVX-512 BF16 / AMX, falls back to slow
    convolutions."""
    if device.type != "cpu" or precision not in ("bf16", "fp16"):  # "auto" never picks a slow one
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


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to pick deterministic reductions (CUDA docs, "Reproducibility")


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device):
    """Deterministic CUDA kernels for the duration of a training run, restored afterwards.

    On a GPU, embedding backward and some convolution algorithms accumulate with atomics in an order
    that changes from run to run, so a stopped and resumed run drifts from an uninterrupted one. This
    turns on ``torch.use_deterministic_algorithms``, fixes cuBLAS's workspace, and makes cuDNN pick
    deterministic algorithms without benchmarking. CPU kernels are deterministic already: nothing to do.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


@contextlib.contextmanager
def full_fp32():
    """IEEE fp32 for convolutions and matrix products on a GPU, restored afterwards.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default on Ampere and newer GPUs.
    Feature networks for FID must compute what the reference graph computes, so they turn it off.
    """
    if not hasattr(torch.backends.cudnn, "conv"):  # PyTorch before 2.9: the legacy flags
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            previous_matmul = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous_matmul
        return
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    previous = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, previous, strict=True):
            backend.fp32_precision = value
