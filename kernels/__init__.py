"""GPU kernels (Triton), each with a PyTorch reference that runs on CPU and in tests.

Triton is optional (CPU-only and Windows installs may lack it): importing this package does not import
it (triton_available tries, on first call), and the kernel modules (kernels.quant_matmul,
kernels.fused_moe) still import without it; only their Triton entry points then raise.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (tried once, on first use: a broken install counts as missing)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a triton built for another torch/driver
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the engine should run the Triton kernel for tensor t (else the PyTorch reference)."""
    return t.is_cuda and triton_available()
