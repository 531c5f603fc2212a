"""Low-bit inference kernels: int8 activation quantization, W8A8 / W4A8 / W2A8 and weight-only GEMMs, conv.

Public API (the deploy layer calls these; each runs the Triton kernel on CUDA and the PyTorch integer
reference, :mod:`kernels.reference`, elsewhere):

* :class:`PackedWeight` (``PackedWeight.from_codes(q, scale, bits, k_split=None)``), packing helpers.
* :func:`quantize_act` float -> int8 codes ``q - 128`` (static per-tensor scale / zero-point).
* :func:`quant_linear` ``x [..., K]`` -> ``[..., N]``: A8 when ``act_scale`` is given, weight-only otherwise.
* :func:`conv2d_quant` the same for Conv2d (1x1 as GEMM, kxk by channels-last im2col + GEMM);
  :func:`conv2d_dequant` / :func:`linear_dequant` the alternative (:mod:`kernels.dequant`): the weight
  unpacked to 16 bits per call, the input rounded to its A8 grid, and a float conv / matmul.
* :mod:`kernels.fp8`: FP8 e4m3 linear layers on cuBLAS (``torch._scaled_mm``).
* :func:`fp8_lowbit_linear` e4m3 ``x [M, K]`` x packed 4- / 2-bit weight -> ``[M, N]`` on FP8 tensor cores, the
  codes unpacked inside the GEMM (:mod:`kernels.gemm_fp8_lowbit`).

Importing this package imports neither triton nor any kernel module; they load on first Triton use.
``backend="triton"`` forces the kernels (on CPU that needs ``TRITON_INTERPRET=1`` set before triton loads),
``backend="torch"`` the reference. The Triton GEMMs are called through ``torch.library`` custom ops
(:mod:`kernels.ops`), so a deployed model compiles with ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

from kernels import reference
from kernels.backend import BACKENDS, TRITON_INSTALLED, has_triton_gpu, resolve_backend
from kernels.conv import conv2d_quant
from kernels.dequant import conv2d_dequant, linear_dequant
from kernels.linear import fp8_lowbit_linear, quant_linear, quant_linear_codes, quantize_act
from kernels.pack import (
    PackedWeight,
    conv_weight_matrix,
    pack_codes,
    pack_int2,
    pack_int4,
    unpack_codes,
    unpack_int2,
    unpack_int4,
)

__all__ = [
    "BACKENDS",
    "TRITON_INSTALLED",
    "PackedWeight",
    "conv2d_dequant",
    "conv2d_quant",
    "conv_weight_matrix",
    "fp8_lowbit_linear",
    "has_triton_gpu",
    "linear_dequant",
    "pack_codes",
    "pack_int2",
    "pack_int4",
    "quant_linear",
    "quant_linear_codes",
    "quantize_act",
    "reference",
    "resolve_backend",
    "unpack_codes",
    "unpack_int2",
    "unpack_int4",
]
