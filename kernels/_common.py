"""What every kernel launcher shares: the device check and nvtx ranges."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ensure_triton_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter; say which is missing."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            continue
        if tensor.device.type == "cpu" and interpreter_enabled():
            continue
        raise RuntimeError(
            f"the Triton kernels got a tensor on '{tensor.device}': they run on CUDA devices, or on the CPU "
            "only under the Triton interpreter (export TRITON_INTERPRET=1 before Python starts; about 100x "
            "slower than the torch backend, for tests). On a CPU use Allegro(cfg, backend='torch')."
        )


def nvtx_range(name: str):
    """An nvtx range (visible in Nsight Systems) on CUDA machines, nothing elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
