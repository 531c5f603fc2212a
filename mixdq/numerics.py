"""IEEE FP32 numerics for measurements, and a record of the settings in effect.

PyTorch runs cuDNN convolutions in TF32 by default on Ampere and later GPUs: inputs and weights are
rounded to a 10-bit mantissa, an error floor near 70 dB SQNR that hides the difference between 4- and
8-bit layers. Sweeps, calibration and evaluations that claim FP32 therefore run inside
:func:`fp32_numerics` (TF32 off for matmul and cuDNN, cuDNN deterministic and not autotuning, so a
re-run gives the same numbers), and write :func:`numerics_settings` into their provenance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

IEEE = "ieee"  # full FP32 (PyTorch's name, as opposed to "tf32")
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def _precision_flags() -> dict[str, Any]:
    """The FP32 precision switches this module sets: ``{name: (object, attribute)}``."""
    backends = torch.backends
    if _NEW_API:
        return {
            "matmul": (backends.cuda.matmul, "fp32_precision"),
            "cudnn_conv": (backends.cudnn.conv, "fp32_precision"),
            "cudnn_rnn": (backends.cudnn.rnn, "fp32_precision"),  # so every cuDNN FP32 op runs one way
        }
    return {"matmul": (backends.cuda.matmul, "allow_tf32"), "cudnn_conv": (backends.cudnn, "allow_tf32")}


# name: (object, attribute, value inside fp32_numerics); autotuning may pick another algorithm on a re-run
_DETERMINISM_FLAGS = {
    "cudnn_deterministic": (torch.backends.cudnn, "deterministic", True),
    "cudnn_benchmark": (torch.backends.cudnn, "benchmark", False),
}


def _effective(name: str, value: Any) -> str:
    """``"ieee"`` or ``"tf32"`` for flag ``name``: a legacy allow_tf32, or a new-API value where ``"none"``
    inherits from the parent (cuDNN's, then the global one)."""
    if isinstance(value, bool):
        return "tf32" if value else IEEE
    backends = torch.backends
    parents = () if name == "matmul" else (getattr(backends.cudnn, "fp32_precision", "none"),)
    for candidate in (value, *parents, getattr(backends, "fp32_precision", "none")):
        if candidate != "none":
            return str(candidate)
    return IEEE


def numerics_settings() -> dict[str, Any]:
    """The FP32 precision and determinism settings in effect now, JSON-ready (part of results' provenance)."""
    settings: dict[str, Any] = {
        f"{name}_fp32": _effective(name, getattr(owner, attribute))
        for name, (owner, attribute) in _precision_flags().items()
    }
    settings["tf32"] = any(settings[f"{name}_fp32"] == "tf32" for name in ("matmul", "cudnn_conv"))
    for name, (owner, attribute, _) in _DETERMINISM_FLAGS.items():
        settings[name] = bool(getattr(owner, attribute))
    settings["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    matmul = torch.backends.cuda.matmul
    settings["fp16_reduced_precision_reduction"] = bool(matmul.allow_fp16_reduced_precision_reduction)
    settings["bf16_reduced_precision_reduction"] = bool(matmul.allow_bf16_reduced_precision_reduction)
    return settings


@contextmanager
def fp32_numerics() -> Iterator[dict[str, Any]]:
    """Run the block with TF32 off for matmul and cuDNN and cuDNN deterministic; yields :func:`numerics_settings`.

    The previous settings come back on exit, so nesting (a bench around a sweep around a calibration) is safe.
    Also a decorator: ``@fp32_numerics()`` runs each call of the function this way.
    """
    precision = _precision_flags()
    saved = {name: getattr(owner, attribute) for name, (owner, attribute) in precision.items()}
    saved_determinism = {name: getattr(owner, attribute) for name, (owner, attribute, _) in _DETERMINISM_FLAGS.items()}
    try:
        for owner, attribute in precision.values():
            setattr(owner, attribute, IEEE if _NEW_API else False)
        for owner, attribute, value in _DETERMINISM_FLAGS.values():
            setattr(owner, attribute, value)
        yield numerics_settings()
    finally:
        for name, (owner, attribute) in precision.items():
            setattr(owner, attribute, saved[name])
        for name, (owner, attribute, _) in _DETERMINISM_FLAGS.items():
            setattr(owner, attribute, saved_determinism[name])
