"""Quantized Conv2d as GEMM over channels-last patches.

    x [B, C, H, W] (any memory format) -> NHWC view -> patches [B*Ho*Wo, kh*kw*C] -> GEMM with the weight packed
    in (kh, kw, C) order (``kernels.pack.conv_weight_matrix``) -> [B, Ho*Wo, N] -> [B, N, Ho, Wo] (channels-last).

* 1x1, stride 1, no padding: the NHWC view *is* the GEMM operand; A8 layers quantize it into int8 codes first
  (under torch.compile fused into the GroupNorm / SiLU that produced it).
* kxk: explicit im2col. A8 layers quantize first (one pass, 1 byte per element) and gather int8 patches, so the
  gathered copy is 9 bytes per input element instead of 18 in fp16; padding is filled with the code of 0.0,
  ``zp - 128``, not 0. This is the measured alternative to an implicit-GEMM kernel.
* :func:`kernels.dequant.conv2d_dequant`, the other measured alternative: the packed weight unpacked to 16
  bits per call, the input rounded to its A8 grid and cuDNN's FP16 conv (the weights stay packed in memory).
* Concat input (up-block ``conv_shortcut``, 1x1): the weight's ``k_split`` is the channel where the second
  tensor starts; each part is quantized with its own (scale, zp) and the GEMM corrects each part's zero-point
  with that part's row sums.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.linear import quant_linear, quant_linear_codes, quantize_act
from kernels.pack import PackedWeight
from kernels.reference import ACT_OFFSET, act_parts


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def im2col_nhwc(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], fills: list
) -> torch.Tensor:
    """``x [B, H, W, C]`` -> patches ``[B*Ho*Wo, kh*kw*C]`` in (kh, kw, C) order; ``fills = [(c0, c1, value)]``
    pads channels c0:c1 with value."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    B, H, W, C = x.shape
    if ph or pw:
        xp = x.new_empty(B, H + 2 * ph, W + 2 * pw, C)
        for c0, c1, value in fills:
            xp[..., c0:c1] = value
        xp[:, ph : ph + H, pw : pw + W] = x
        x = xp
    patches = x.unfold(1, kh, sh).unfold(2, kw, sw)  # [B, Ho, Wo, C, kh, kw]
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * C)


def conv2d_quant(
    x: torch.Tensor,
    weight: PackedWeight,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    act_scale: float | tuple[float, float] | None = None,
    act_zp: int | tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    *,
    act_bits: int = 8,
    backend: str = "auto",
    act_params: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantized conv: W{8,4,2}A8 when ``act_scale`` is given, else weight-only. Returns ``[B, N, Ho, Wo]``.

    ``act_params``: the same quantizers as a float32 ``[3, P]`` tensor of rows ``(1 / s, zp, s)``
    (:func:`kernels.reference.act_params_tensor`), used instead of the Python numbers under torch.compile: the
    same codes, with no kernel compiled and no guard installed per layer (see :func:`kernels.quant_linear_codes`).
    """
    (kh, kw), st, pad = _pair(kernel_size), _pair(stride), _pair(padding)
    B, C, H, W = x.shape
    if weight.in_features != kh * kw * C:
        raise ValueError(f"weight in_features={weight.in_features} != kh*kw*C = {kh}*{kw}*{C}")
    if weight.k_split is not None and (kh, kw) != (1, 1):
        raise ValueError(f"a concat (k_split) input is supported for 1x1 convs only, got kernel {kh}x{kw}")
    Ho, Wo = (H + 2 * pad[0] - kh) // st[0] + 1, (W + 2 * pad[1] - kw) // st[1] + 1
    xh = x.permute(0, 2, 3, 1)
    if (kh, kw, *st, *pad) == (1, 1, 1, 1, 0, 0):
        cols = xh.reshape(-1, C)
        if act_scale is not None and act_params is not None:
            cols = reference.quantize_act_parts_tensors(cols, act_params[0], act_params[1], weight.k_split, act_bits)
    elif act_scale is None:
        cols = im2col_nhwc(xh, (kh, kw), st, pad, [(0, C, 0.0)])
    else:
        parts = act_parts(weight, act_scale, act_zp)
        xq = torch.empty(B, H, W, C, dtype=torch.int8, device=x.device)
        # under torch.compile the PyTorch quantizer (same codes) lets Inductor fuse it into what precedes
        quant_backend = "torch" if torch.compiler.is_compiling() else backend
        fills = []
        for p, (c0, c1, s, z) in enumerate(parts):
            if act_params is not None:
                inv_t, zp_t = act_params[0, p], act_params[1, p]
                xq[..., c0:c1] = reference.quantize_act_tensors(xh[..., c0:c1], inv_t, zp_t, act_bits)
                fills.append((c0, c1, (zp_t - ACT_OFFSET).to(torch.int8)))
            else:
                quantize_act(xh[..., c0:c1], s, z, act_bits, out=xq[..., c0:c1], backend=quant_backend)
                fills.append((c0, c1, z - ACT_OFFSET))
        cols = im2col_nhwc(xq, (kh, kw), st, pad, fills)
    out_dtype = x.dtype if act_scale is not None else None  # int8 patches in, x's dtype out
    if act_scale is not None and act_params is not None:
        y = quant_linear_codes(cols, weight, act_params, bias, backend=backend, out_dtype=out_dtype)
    else:
        y = quant_linear(cols, weight, act_scale, act_zp, bias, act_bits=act_bits, backend=backend, out_dtype=out_dtype)
    return y.view(B, Ho, Wo, -1).permute(0, 3, 1, 2)
