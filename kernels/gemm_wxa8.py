"""W8A8 / W4A8 / W2A8 GEMM: int8 activations x int8, packed int4 or packed int2 weights -> int32, fused epilogue.

    acc_p[m, n] = sum_{k in part p} x_int8[m, k] * w[n, k]                      int32 accumulator (tl.dot)
    y[m, n]     = sum_p float32(acc_p + (128 - zp_p) * rowsum_p[n]) * (s_a_p * s_w[n])  + bias[n]

x:      [M, K] int8 codes ``q - 128`` (from :mod:`kernels.act_quant`), any strides; or float16/bfloat16/float32,
        then quantized tile by tile in the prologue (``quantize_tile``: the same codes, no separate pass).
weight: :class:`kernels.pack.PackedWeight` ``[N, K]``: int8 codes, or uint8 with 2 (int4) / 4 (int2) codes per
        byte along K, unpacked in registers (shift, mask, subtract the offset) right before ``tl.dot``.
out:    [M, N] float16 (or bfloat16 / float32), row-major; int32 ``sum_p (acc_p + corr_p)`` with ``return_acc``.

A K split (concat input with two activation quantizers) runs two K loops into two accumulators; the weight's
``rowsum [2, N]`` holds one row sum per part. |acc| <= 128 * 127 * K stays in int32 for K < 132k.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.act_quant import quantize_tile
from kernels.pack import PackedWeight
from kernels.reference import ACT_OFFSET, act_parts, check_act_params, inv_scale
from kernels.tiles import device_sms, launch_gemm, prune_by_m


def get_gemm_a8_autotune_config() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    cfg = lambda m, n, k, w, s: triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    return [
        cfg(128, 256, 128, 8, 3),
        cfg(256, 128, 128, 8, 3),
        cfg(128, 128, 128, 8, 4),
        cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 128, 4, 4),
        cfg(64, 64, 128, 4, 4),
        cfg(32, 128, 128, 4, 4),
        cfg(16, 64, 256, 4, 4),
    ]


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in GROUP_M-row groups, for L2 reuse (Triton tutorial 03)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // num_pid_in_group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_pid_in_group) % group_size, (pid % num_pid_in_group) // group_size


@triton.jit
def load_weight_tile(w_ptr, k0, offs_n, K, N, stride_wn, stride_wk, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 codes of W^T for rows k0 : k0 + BLOCK_K, ``[BLOCK_K, BLOCK_N]`` (k0 a multiple of 8 // W_BITS).

    Packed weights load their bytes ``[BLOCK_N, BLOCK_K * W_BITS / 8]`` contiguous along K (vector loads), split
    each byte into its codes, low bits first, and interleave them back into K order (see kernels.pack).
    """
    if W_BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask, other=0)
    else:
        offs_b = k0 // (8 // W_BITS) + tl.arange(0, BLOCK_K // (8 // W_BITS))
        mask = (offs_n[:, None] < N) & (offs_b[None, :] < tl.cdiv(K, 8 // W_BITS))
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk, mask=mask, other=0)
        p = p.to(tl.int32)
        if W_BITS == 4:
            u = tl.interleave(p & 15, p >> 4)
        else:
            u = tl.interleave(tl.interleave(p & 3, (p >> 4) & 3), tl.interleave((p >> 2) & 3, p >> 6))
        w = tl.trans((u - (1 << (W_BITS - 1))).to(tl.int8))
    return w


@triton.jit
def a8_k_loop(
    acc, a_ptr, w_ptr, offs_m, offs_n, k_start, k_end, M, N,
    stride_am, stride_ak, stride_wn, stride_wk,
    a_inv_scale, a_zp,
    A_QMAX: tl.constexpr, A_IS_FLOAT: tl.constexpr, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += x[offs_m, k_start:k_end] @ W[offs_n, k_start:k_end]^T in int32."""
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
        if A_IS_FLOAT:
            a = tl.where(a_mask, quantize_tile(a, a_inv_scale, a_zp, A_QMAX), 0).to(tl.int8)
        w = load_weight_tile(w_ptr, k0, offs_n, k_end, N, stride_wn, stride_wk, W_BITS, BLOCK_K)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.autotune(configs=get_gemm_a8_autotune_config(), key=["M", "N", "K", "W_BITS"],
                 prune_configs_by={"early_config_prune": prune_by_m})  # fmt: skip
@triton.jit
def gemm_a8_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, rowsum_ptr, bias_ptr, out_ptr,
    # sizes; K_SPLIT = K without a split
    M, N, K, K_SPLIT,
    # strides (elements; the packed weight's in bytes)
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    # activation quantizer of each part: scale and 1 / scale (fp32), zero-point (fp32), 128 - zp (int32)
    a_scale1, a_inv1, a_zp1, a_corr1, a_scale2, a_inv2, a_zp2, a_corr2,
    # meta
    A_QMAX: tl.constexpr, A_IS_FLOAT: tl.constexpr, W_BITS: tl.constexpr,
    HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # main loop(s): int32 accumulators
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = a8_k_loop(acc, a_ptr, w_ptr, offs_m, offs_n, 0, K_SPLIT, M, N, stride_am, stride_ak, stride_wn, stride_wk,
                    a_inv1, a_zp1, A_QMAX, A_IS_FLOAT, W_BITS, BLOCK_K)  # fmt: skip
    tot = acc + a_corr1 * tl.load(rowsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = tot.to(tl.float32) * (a_scale1 * w_scale)[None, :]
    if HAS_SPLIT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc2 = a8_k_loop(acc2, a_ptr, w_ptr, offs_m, offs_n, K_SPLIT, K, M, N, stride_am, stride_ak, stride_wn,
                         stride_wk, a_inv2, a_zp2, A_QMAX, A_IS_FLOAT, W_BITS, BLOCK_K)  # fmt: skip
        tot2 = acc2 + a_corr2 * tl.load(rowsum_ptr + N + offs_n, mask=n_mask, other=0)[None, :]
        tot += tot2
        out += tot2.to(tl.float32) * (a_scale2 * w_scale)[None, :]

    # epilogue: zero-point correction and scales done above; bias; store
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if RETURN_ACC:
        tl.store(out_ptrs, tot, mask=out_mask)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def gemm_a8(
    x: torch.Tensor,
    weight: PackedWeight,
    act_scale: float | tuple[float, float],
    act_zp: int | tuple[int, int],
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
    out_dtype: torch.dtype = torch.float16,
    return_acc: bool = False,
) -> torch.Tensor:
    """``x [M, K]`` int8 codes or float -> ``[M, N]``; same contract as :func:`kernels.reference.gemm_a8`."""
    # 1. check
    parts = act_parts(weight, act_scale, act_zp)
    for _, _, s, z in parts:
        check_act_params(s, z, act_bits)
    M, K = x.shape
    N = weight.out_features
    if K != weight.in_features:
        raise ValueError(f"x has K={K} columns but the weight has in_features={weight.in_features}")
    if x.dtype not in (torch.int8, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be int8 codes or float16/bfloat16/float32, got {x.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    # 2. allocate
    out = torch.empty(M, N, dtype=torch.int32 if return_acc else out_dtype, device=x.device)
    (_, k_split, s1, z1), (_, _, s2, z2) = parts[0], parts[-1]
    # 3. launch
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    launch_gemm(
        gemm_a8_kernel, grid, M, N, device_sms(x),
        x, weight.data, weight.scale, weight.rowsum, bias if bias is not None else weight.scale, out,
        M, N, K, k_split,
        x.stride(0), x.stride(1), weight.data.stride(0), weight.data.stride(1), out.stride(0), out.stride(1),
        s1, inv_scale(s1), float(z1), ACT_OFFSET - z1, s2, inv_scale(s2), float(z2), ACT_OFFSET - z2,
        A_QMAX=2**act_bits - 1, A_IS_FLOAT=x.dtype != torch.int8, W_BITS=weight.bits,
        HAS_SPLIT=len(parts) == 2, HAS_BIAS=bias is not None, RETURN_ACC=return_acc,
    )  # fmt: skip
    return out
