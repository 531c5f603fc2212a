"""Static per-tensor activation quantization: float -> int8 codes with the zero-point folded.

    q      = clamp(round_half_even(float32(x) * inv_s) + zp, 0, 2**bits - 1),   inv_s = float32(1 / s)
    x_int8 = q - 128

x:   [R, C] float16 / bfloat16 / float32, any strides (a channels-last NHWC view flattened to [B*H*W, C] works).
out: [R, C] int8, any strides: a column slice of a wider buffer lets the two parts of a concat input
     (up-block ``conv_shortcut``) be quantized with their own (s, zp) into one GEMM operand.

Rounding is round-half-even like ``torch.round``, written with ``floor`` so the same code runs in the
interpreter; the product is clamped before the rounding adds (so it cannot be contracted into an FMA),
hence codes equal :func:`kernels.reference.quantize_act` and the fake-quant layers' codes exactly.
``quantize_tile`` is the per-tile rule (kept separate so it reads like the reference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import check_act_params, inv_scale
from kernels.tiles import autotune_enabled


def get_act_quant_autotune_config() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 64})]
    return [
        triton.Config({"BLOCK_R": 16, "BLOCK_C": 256}, num_warps=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 128}, num_warps=8),
    ]


@triton.jit
def quantize_tile(x, inv_scale, zp, QMAX: tl.constexpr):
    """Float tile -> int8 ``q - 128`` (inv_scale: fp32 scalar 1 / s, zp: integer-valued fp32 scalar)."""
    v = x.to(tl.float32) * inv_scale
    v = tl.minimum(tl.maximum(v, -1024.0), 1024.0)  # beyond this every code saturates anyway
    r = tl.floor(v + 0.5)
    r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even
    q = tl.minimum(tl.maximum(r + zp, 0.0), QMAX)
    return (q - 128.0).to(tl.int8)


@triton.autotune(configs=get_act_quant_autotune_config(), key=["C"])
@triton.jit
def act_quant_kernel(
    # pointers
    x_ptr, out_ptr,
    # sizes and strides (elements)
    R, C, stride_xr, stride_xc, stride_or, stride_oc,
    # quantizer
    inv_scale, zp, QMAX: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    q = quantize_tile(x, inv_scale, zp, QMAX)
    tl.store(out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc, q, mask=mask)


def quantize_act(
    x: torch.Tensor, scale: float, zp: int, bits: int = 8, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float ``x [..., C]`` -> int8 ``[..., C]`` (``q - 128``); writes into ``out`` (any strides) when given."""
    # 1. check
    check_act_params(scale, zp, bits)
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    # 2. allocate
    if out is None:
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if out.dtype != torch.int8 or out.shape != x.shape:
        raise ValueError(f"out must be int8 of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    o2 = out.view(-1, out.shape[-1]) if out.dim() != 2 else out
    # 3. launch
    R, C = x2.shape
    grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(C, META["BLOCK_C"]))
    # a memory-bound pass: the middle config is within noise of the best, and skipping the autotuner saves
    # a benchmark per new channel count at warm-up (kernels.tiles)
    kernel, config = act_quant_kernel, {}
    if not autotune_enabled():
        configs = act_quant_kernel.configs
        kernel, config = act_quant_kernel.fn, configs[len(configs) // 2].all_kwargs()
    kernel[grid](
        x2,
        o2,
        R,
        C,
        x2.stride(0),
        x2.stride(1),
        o2.stride(0),
        o2.stride(1),
        inv_scale(scale),
        float(zp),
        QMAX=2**bits - 1,
        **config,
    )
    return out
