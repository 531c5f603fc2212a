"""Weight-only W8A16 / W4A16 / W2A16 GEMM: 16-bit activations x int8 / packed int4 / packed int2 weights.

    acc[m, n] = sum_k x[m, k] * float16(w[n, k])          fp32 accumulator (tl.dot on 16-bit operands)
    y[m, n]   = acc[m, n] * s_w[n] + bias[n]

With a K split (the up-block ``conv_shortcut`` concat) each K part has its own weight scale row
(``scale [2, N]``), so the parts run into two accumulators: ``y = acc_0 * s_w_0[n] + acc_1 * s_w_1[n] + bias[n]``.

The K loop is :func:`kernels.gemm_wxa8.k_loop` (same weight layouts), always with the weight tile as the MMA's
left operand (``SWAP_AB``), so the converted weight stays in registers on Hopper while the 16-bit x streams
through shared memory. Measured on an H200 (2026-11-28), the orientation made no difference here (W8A16
over the UNet's linear shapes: 23.8 ms right operand, 24.4 ms left; FP16 cuBLAS 7.8 ms); the planar int4
layout took W4A16 from 67.2 to 28.1 ms. These kernels are 3x slower than FP16 at the UNet's compute-bound
shapes: their use is memory at small M, not speed at 1024 px.

x:      [M, K] float16 or bfloat16, any strides.
weight: :class:`kernels.pack.PackedWeight` ``[N, K]``; codes are unpacked in registers and converted to x's
        dtype (exact: |q| <= 127); the per-channel scale is applied once in the epilogue, not per element.
out:    [M, N] x's dtype, row-major.

For protected layers whose activations stay 16-bit and the W3.66A16 setting: the win is weight bytes
(memory-bound shapes, small M), not math.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.gemm_wxa8 import k_loop, zeros_acc
from kernels.pack import PackedWeight
from kernels.tiles import device_sms, grouped_tile, launch_gemm, prune_by_m


def get_gemm_a16_autotune_config() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    cfg = lambda m, n, k, w, s: triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    return [
        cfg(128, 256, 64, 8, 3),
        cfg(128, 128, 64, 4, 4),
        cfg(128, 128, 64, 8, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(64, 64, 64, 4, 4),
        cfg(32, 128, 128, 4, 4),
        cfg(16, 64, 256, 4, 4),
        cfg(16, 128, 128, 4, 4),
    ]


@triton.autotune(configs=get_gemm_a16_autotune_config(), key=["M", "N", "K", "W_BITS"],
                 prune_configs_by={"early_config_prune": prune_by_m})  # fmt: skip
@triton.jit(do_not_specialize=["M"])  # see kernels.gemm_wxa8.PER_LAYER_INTS
def gemm_a16_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes; K_SPLIT = K without a split (a packed weight's K parts are padded separately); W_BYTE2: its byte
    M, N, K, K_SPLIT, W_BYTE2,
    # strides (elements; the packed weight's in bytes)
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    # meta
    W_BITS: tl.constexpr, HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    acc = zeros_acc(BLOCK_M, BLOCK_N, True, tl.float32)  # [BLOCK_N, BLOCK_M]: out^T = W x^T
    acc = k_loop(acc, a_ptr, w_ptr, offs_m, offs_n, 0, K_SPLIT, 0, M, N, stride_am, stride_ak, stride_wn, stride_wk,
                 W_BITS, BLOCK_K, True)  # fmt: skip
    acc = tl.trans(acc)

    # epilogue: per-channel scale (each K part's own row), bias, store
    out = acc * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SPLIT:
        acc2 = zeros_acc(BLOCK_M, BLOCK_N, True, tl.float32)
        acc2 = k_loop(acc2, a_ptr, w_ptr, offs_m, offs_n, K_SPLIT, K, W_BYTE2, M, N, stride_am, stride_ak, stride_wn,
                      stride_wk, W_BITS, BLOCK_K, True)  # fmt: skip
        acc2 = tl.trans(acc2)
        out += acc2 * tl.load(w_scale_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=out_mask)  # fmt: skip


def gemm_a16(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` float16/bfloat16 -> ``[M, N]`` same dtype; contract of :func:`kernels.reference.gemm_a16`."""
    # 1. check
    M, K = x.shape
    N = weight.out_features
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float16 or bfloat16 for the weight-only kernel, got {x.dtype}")
    if K != weight.in_features:
        raise ValueError(f"x has K={K} columns but the weight has in_features={weight.in_features}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    # 2. allocate
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # 3. launch
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    launch_gemm(
        gemm_a16_kernel, grid, M, N, device_sms(x),
        x, weight.data, weight.scale, bias if bias is not None else weight.scale, out,
        M, N, K, weight.k_split or K, weight.part_byte_offsets()[1],
        x.stride(0), x.stride(1), weight.data.stride(0), weight.data.stride(1), out.stride(0), out.stride(1),
        W_BITS=weight.bits, HAS_SPLIT=weight.k_split is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return out
