"""Where a kernel runs: ``"triton"`` (CUDA, or the interpreter with ``TRITON_INTERPRET=1``) or ``"torch"``."""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "triton", "torch")

# read once at import: torch.compile traces resolve_backend, and a cached function call there breaks the graph
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def has_triton_gpu() -> bool:
    """True when the Triton kernels can run on a CUDA device here."""
    return TRITON_INSTALLED and torch.cuda.is_available()


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"`` for a tensor on x's device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and TRITON_INSTALLED else "torch"
    return backend
