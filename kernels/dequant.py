"""The dequantizing paths: packed weight unpacked to 16 bits per call, input rounded to its A8 grid, and the
float product by cuBLAS / cuDNN (or the CPU's float kernels).

This is the fake-quant layer's arithmetic, so the numbers are the fake-quant numbers, while the layer holds
only packed codes (the memory saving is real; the speed is FP16's plus one small unpacking kernel). Why it
exists: on an H200 a 3x3 conv as int8 im2col + our GEMM cost more than cuDNN's FP16 conv, and our packed
int4 / int2 GEMMs are slower than FP16 cuBLAS at the SDXL UNet's shapes, while unpacking a weight is one
elementwise kernel (measured: ``bench/gpu_unet.py``, ``bench/gpu_kernels.py``). Under torch.compile the
input rounding fuses into the op that produced the input; 4- and 2-bit weights are unpacked by
:mod:`kernels.unpack` on the Triton backend, 8-bit ones by one Inductor kernel.

``act_qparams`` ``(1 / s, zp, s)``: float32 tensors with one element per input part (``weight.k_split``
splits the input features in two, each with its own quantizer); ``None`` for weight-only layers.
``backend``: where 4- and 2-bit weights are unpacked (``"triton"``: :mod:`kernels.unpack`; ``"auto"``: Triton
on CUDA).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.backend import resolve_backend
from kernels.conv import _pair
from kernels.pack import PackedWeight, part_bounds

ActQParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fake_quantize_parts(
    x: torch.Tensor, act_qparams: ActQParams, features: int, k_split: int | None, dim: int, bits: int
) -> torch.Tensor:
    """``x`` rounded to its activation grid, part p of dimension ``dim`` (split at ``k_split``) with quantizer p."""
    inv, zp, scale = act_qparams
    bounds = part_bounds(features, k_split)
    parts = [
        reference.fake_quantize_act_tensors(x.narrow(dim, a, b - a), inv[i], zp[i], scale[i], bits)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def linear_dequant(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    act_qparams: ActQParams | None = None,
    act_bits: int = 8,
    backend: str = "auto",
    dequantized: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` by a float matmul with the dequantized weight (see the module docstring).

    ``dequantized``: that weight already made (``[N, K]``, x's dtype; a block's grouped unpacking,
    :mod:`mixdq.deploy.unpack_groups`), else it is unpacked here."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.in_features}")
    if act_qparams is not None:
        x = fake_quantize_parts(x, act_qparams, weight.in_features, weight.k_split, -1, act_bits)
    w = dequantized if dequantized is not None and dequantized.dtype == x.dtype else None
    if w is None:
        w = weight.dequantize(x.dtype, resolve_backend(x, backend))
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def conv2d_dequant(
    x: torch.Tensor,
    weight: PackedWeight,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    bias: torch.Tensor | None = None,
    *,
    act_qparams: ActQParams | None = None,
    act_bits: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Conv by cuDNN (or the CPU's conv) on the dequantized weight: ``[B, C, H, W]`` -> ``[B, N, Ho, Wo]``.

    The weight is packed in channels-last ``(kh, kw, C)`` order (:func:`kernels.conv_weight_matrix`); a split
    input (``k_split``) is supported for 1x1 convs, whose K parts are channel parts.
    """
    kh, kw = _pair(kernel_size)
    n, c = weight.out_features, weight.in_features // (kh * kw)
    if x.shape[1] != c:
        raise ValueError(f"input has {x.shape[1]} channels, the weight expects {c}")
    w = weight.dequantize(x.dtype, resolve_backend(x, backend))
    w = w.view(n, kh, kw, c).permute(0, 3, 1, 2)  # back to [N, C, kh, kw]
    if act_qparams is not None:
        x = fake_quantize_parts(x, act_qparams, c, weight.k_split, 1, act_bits)
    return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding)
