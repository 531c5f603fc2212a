"""W8A8 GEMM for large shapes on Hopper: tiles loaded by the Tensor Memory Accelerator, a persistent grid.

The same contract as :func:`kernels.gemm_wxa8.gemm_a8` for 8-bit weights without a K split (int8 codes
``x [M, K]``, epilogue ``(acc + (128 - zp) * rowsum[n]) * s_a * s_w[n] + bias[n]``), computed differently:
TMA copies whole ``[128, 128]`` operand tiles into shared memory asynchronously (tensor descriptors made on the
host) and each of ``#SMs`` programs loops over output tiles, so one tile's epilogue overlaps the next tile's
loads. On an H200 at 8192^3 (``bench/lab/gemm_a8_tma_probe.py``, 2026-11-28, session 7): 902 us = 1,218 TOPS = 62%
of the H100's dense int8 peak, against 1,030 us (54%) for the pointer-loading kernel and 1,208 us for
``torch._int_mm``, output identical. 128x256 tiles with 8 warps and 3 stages need 214 KB of shared memory;
4 stages do not fit.

Only where the tiles fill the GPU several times over and K is long (:func:`use_tma`): the UNet's shapes keep
the measured pointer-loading kernel until this one is measured there (``bench/gpu_kernels.py``, column
``w8a8_tma``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.pack import PackedWeight
from kernels.tiles import grouped_tile

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the probe's fastest tile (128x256 and 256x128 tied); the launch rule counts tiles of this size everywhere
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
# what is launched: small tiles in Triton's interpreter (CPU tests)
CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2} if INTERPRET else GPU_CONFIG
GROUP_M = 8
MIN_WAVES = 4  # output tiles per SM, at least: a persistent grid pays off when each program has several
MIN_K = 2048  # K steps per tile, at least 16: the pipeline needs a long K loop


def tma_available(x: torch.Tensor) -> bool:
    """TMA exists on this tensor's device: a Hopper-or-newer GPU, or Triton's interpreter on the CPU."""
    if INTERPRET and not x.is_cuda:
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def tma_shape_ok(x: torch.Tensor, weight: PackedWeight) -> bool:
    """What TMA needs structurally: 8-bit weights in one K part, row-major operands, 16-byte aligned rows."""
    K = x.shape[1]
    return (
        weight.bits == 8
        and weight.k_split is None
        and x.dtype == torch.int8
        and x.stride(1) == 1
        and weight.data.stride(1) == 1
        and K % 16 == 0
        and x.stride(0) % 16 == 0
        and weight.data.stride(0) % 16 == 0
    )


def use_tma(x: torch.Tensor, weight: PackedWeight, sms: int) -> bool:
    """The rule: TMA for large GEMMs only (see the module docstring)."""
    M, K = x.shape
    tiles = triton.cdiv(M, GPU_CONFIG["BLOCK_M"]) * triton.cdiv(weight.out_features, GPU_CONFIG["BLOCK_N"])
    return K >= MIN_K and tiles >= MIN_WAVES * sms and tma_available(x) and tma_shape_ok(x, weight)


@triton.jit
def gemm_a8_tma_kernel(
    a_desc, w_desc, w_scale_ptr, rowsum_ptr, bias_ptr, out_ptr,
    M, N, K, stride_om, a_scale, a_corr, a_params_ptr,
    HAS_BIAS: tl.constexpr, ACT_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):  # fmt: skip
    """Program p computes output tiles p, p + NUM_PROGRAMS, ... (GROUP_M-row groups, for L2 reuse)."""
    if ACT_FROM_PTR:  # float32 [3, 1] rows (1 / s, zp, s): see kernels.gemm_wxa8.gemm_a8_codes
        a_scale = tl.load(a_params_ptr + 2)
        a_corr = 128 - tl.load(a_params_ptr + 1).to(tl.int32)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, ki * BLOCK_K])  # out-of-bounds rows / columns read as 0
            w = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        tot = acc + a_corr * tl.load(rowsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = tot.to(tl.float32) * (a_scale * w_scale)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = (offs_m[:, None] < M) & n_mask[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask
        )


def gemm_a8_tma(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    a_scale: float,
    a_corr: int,
    a_params: torch.Tensor | None,
    sms: int,
) -> torch.Tensor:
    """``[M, N]`` in ``out_dtype`` from int8 codes ``x [M, K]``; the quantizer as numbers (``a_scale``,
    ``a_corr = 128 - zp``) or, when ``a_params`` is given, read from that float32 ``[3, 1]`` tensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not tma_shape_ok(x, weight):
        raise ValueError("the TMA GEMM takes 8-bit weights without a K split and row-major int8 codes, K % 16 == 0")
    M, K = x.shape
    N = weight.out_features
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    bm, bn, bk = CONFIG["BLOCK_M"], CONFIG["BLOCK_N"], CONFIG["BLOCK_K"]
    programs = min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    gemm_a8_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(weight.data, [bn, bk]),
        weight.scale, weight.rowsum, bias if bias is not None else weight.scale, out,
        M, N, K, out.stride(0), a_scale, a_corr, a_params if a_params is not None else weight.scale,
        HAS_BIAS=bias is not None, ACT_FROM_PTR=a_params is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, NUM_PROGRAMS=programs,
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"],
    )  # fmt: skip
    return out
