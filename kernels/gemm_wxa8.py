"""W8A8 / W4A8 / W2A8 GEMM: int8 activations x int8, packed int4 or packed int2 weights -> int32, fused epilogue.

    acc_p[m, n] = sum_{k in part p} x_int8[m, k] * w[n, k]                      int32 accumulator (tl.dot)
    y[m, n]     = sum_p float32(acc_p + (128 - zp_p) * rowsum_p[n]) * (s_a_p * s_w_p[n])  + bias[n]

x:      [M, K] int8 codes ``q - 128`` (from :mod:`kernels.act_quant`), any strides. A float x is quantized by
        the activation-quantization kernel first (one memory-bound pass); under torch.compile the quantization
        is graph ops that Inductor fuses into the op producing x. (A quantize-in-the-GEMM-prologue variant ran
        3-11x slower on an H200: every output-column tile re-quantized its x tiles on the CUDA cores.)
weight: :class:`kernels.pack.PackedWeight` ``[N, K]``: int8 codes, or uint8 planar chunks of 128 codes with 2
        (int4) / 4 (int2) codes per byte. A chunk unpacks with one shift and mask per K-slice of 64 (32) codes,
        and each slice meets its own slice of x in a ``tl.dot`` (no interleave: on an H200 the interleaved
        layout's shuffles made W4A8 GEMMs take 4.2x as long as W8A8 over the UNet's shapes; planar: 2.0x).
out:    [M, N] float16 (or bfloat16 / float32), row-major; int32 ``sum_p (acc_p + corr_p)`` with ``return_acc``.

``SWAP_AB``: compute ``out^T = W x^T`` so the weight tile is the MMA's left operand. On Hopper a computed
(unpacked) left operand then stays in registers (wgmma's register operand) while x streams through shared
memory, and for small M the weight's N fills the MMA's 64-row side. Measured on an H200 (2026-11-28): 1.23x
faster W8A8 at M = 77 (the text tokens), 2% faster W4A8 over the UNet, 6% slower W8A8 at M = 1024; so
:func:`swap_ab` swaps for packed weights and M < 128.

A K split (concat input with two activation quantizers) runs two K loops into two accumulators; the weight's
``rowsum [2, N]`` holds one row sum per part and its ``scale [2, N]`` one weight scale per part (MixDQ's two
weight quantizers of a split shortcut), so each part's epilogue term uses its own row. |acc| <= 128 * 127 * K stays in int32 for K < 132k.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import gemm_a8_tma
from kernels.act_quant import quantize_act
from kernels.pack import PACK_CHUNK, PackedWeight, part_bounds
from kernels.reference import ACT_OFFSET, act_parts, check_act_params
from kernels.tiles import device_sms, grouped_tile, launch_gemm, prune_by_m

CHUNK = tl.constexpr(PACK_CHUNK)  # a jit function may read a global only as a constexpr
# Integer arguments that vary from layer to layer without changing the code worth generating: left
# unspecialized, so Triton does not compile a variant per value class (== 1, divisible by 16, other). Counted
# from the SDXL UNet's layer shapes and the launch rule: 18 -> 11 compiles for W8A8, 38 -> 22 for MixDQ ~W4A8.
# K_SPLIT and W_BYTE2 stay specialized: their divisibility by 16 is what lets the K-masked loads vectorize
# into cp.async copies, and without it Triton does not pipeline the K loop (tests/compile_sm90.py shows it).
PER_LAYER_INTS = ["M", "a_corr1", "a_corr2"]


def get_gemm_a8_autotune_config() -> list[triton.Config]:
    """Tiles the rule (kernels.tiles) and the autotuner choose from.

    Swept on an H200 at every SDXL linear shape (bench/gpu_kernels.py --sweep-tiles w8a8, 2026-11-28;
    bench/results/gpu_kernels_tiles_h200_2026-11-28.json): 128x128x64 with 4 warps was the fastest tile at
    every shape that fills a wave with it (1.14-1.41x faster than the 8-warp 128x256 / 256x128 / 128x128x128
    tiles the rule used to pick there, and as fast at 8192^3), so those are gone; the smaller tiles win
    where 128x128 leaves SMs idle.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    cfg = lambda m, n, k, w, s: triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    return [
        cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 128, 4, 4),
        cfg(64, 64, 128, 4, 4),
        cfg(32, 128, 128, 4, 4),
        cfg(16, 64, 256, 4, 4),
    ]


@triton.jit
def zeros_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr, dtype: tl.constexpr):
    """The accumulator tile: ``[BLOCK_M, BLOCK_N]``, transposed when SWAP_AB."""
    # one return: Triton rejects two returns of different shapes even under a constexpr condition
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=dtype)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
    return acc


@triton.jit
def mma(acc, a, w, SWAP_AB: tl.constexpr):
    """acc += a @ w^T (``a [BM, BK]``, ``w [BN, BK]``), or acc^T += w @ a^T when SWAP_AB."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(a), acc, out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def k_loop(
    acc, a_ptr, w_ptr, offs_m, offs_n, k_start, k_end, w_byte0, M, N,
    stride_am, stride_ak, stride_wn, stride_wk,
    W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    """acc += x[offs_m, k_start:k_end] @ W[offs_n, k_start:k_end]^T; x int8 codes or 16-bit floats.

    8-bit weights: BLOCK_K columns per step. Packed weights: one 128-code chunk per step (bytes from
    ``w_byte0``, the part's first byte), unpacked slice by slice, each slice cast to x's dtype (exact).
    """
    n_mask = offs_n[:, None] < N
    if W_BITS == 8:
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
            w_mask = n_mask & (offs_k[None, :] < k_end)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=w_mask, other=0)
            acc = mma(acc, a, w.to(a.dtype), SWAP_AB)
    else:
        PER_BYTE: tl.constexpr = 8 // W_BITS
        SLICE: tl.constexpr = CHUNK // PER_BYTE  # codes per slice = bytes per chunk
        offs_j = tl.arange(0, SLICE)
        for k0 in range(k_start, k_end, CHUNK):
            byte0 = w_byte0 + (k0 - k_start) // PER_BYTE
            p = tl.load(w_ptr + offs_n[:, None] * stride_wn + (byte0 + offs_j)[None, :], mask=n_mask, other=0)
            p = p.to(tl.int32)
            for i in tl.static_range(PER_BYTE):
                offs_k = k0 + i * SLICE + offs_j
                a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
                w = ((p >> (i * W_BITS)) & ((1 << W_BITS) - 1)) - (1 << (W_BITS - 1))
                acc = mma(acc, a, w.to(tl.int8).to(a.dtype), SWAP_AB)
    return acc


@triton.autotune(configs=get_gemm_a8_autotune_config(), key=["M", "N", "K", "W_BITS", "SWAP_AB"],
                 prune_configs_by={"early_config_prune": prune_by_m})  # fmt: skip
@triton.jit(do_not_specialize=PER_LAYER_INTS)
def gemm_a8_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, rowsum_ptr, bias_ptr, out_ptr,
    # sizes; K_SPLIT = K without a split; W_BYTE2: first byte (8-bit: column) of the second part's weight
    M, N, K, K_SPLIT, W_BYTE2,
    # strides (elements; the packed weight's in bytes)
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    # activation quantizer of each part: scale (fp32) and 128 - zp (int32), or with ACT_FROM_PTR read from
    # a_params_ptr, float32 [3, parts] rows (1 / s, zp, s) (deployed layers under torch.compile: see gemm_a8_codes)
    a_scale1, a_corr1, a_scale2, a_corr2, a_params_ptr,
    # meta
    W_BITS: tl.constexpr, HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_ACC: tl.constexpr,
    SWAP_AB: tl.constexpr, ACT_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if ACT_FROM_PTR:
        parts = 2 if HAS_SPLIT else 1
        a_scale1 = tl.load(a_params_ptr + 2 * parts)
        a_corr1 = 128 - tl.load(a_params_ptr + parts).to(tl.int32)
        if HAS_SPLIT:
            a_scale2 = tl.load(a_params_ptr + 2 * parts + 1)
            a_corr2 = 128 - tl.load(a_params_ptr + parts + 1).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # main loop(s): int32 accumulators
    acc = zeros_acc(BLOCK_M, BLOCK_N, SWAP_AB, tl.int32)
    acc = k_loop(acc, a_ptr, w_ptr, offs_m, offs_n, 0, K_SPLIT, 0, M, N, stride_am, stride_ak, stride_wn, stride_wk,
                 W_BITS, BLOCK_K, SWAP_AB)  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)
    tot = acc + a_corr1 * tl.load(rowsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = tot.to(tl.float32) * (a_scale1 * w_scale)[None, :]
    if HAS_SPLIT:
        acc2 = zeros_acc(BLOCK_M, BLOCK_N, SWAP_AB, tl.int32)
        acc2 = k_loop(acc2, a_ptr, w_ptr, offs_m, offs_n, K_SPLIT, K, W_BYTE2, M, N, stride_am, stride_ak, stride_wn,
                      stride_wk, W_BITS, BLOCK_K, SWAP_AB)  # fmt: skip
        if SWAP_AB:
            acc2 = tl.trans(acc2)
        tot2 = acc2 + a_corr2 * tl.load(rowsum_ptr + N + offs_n, mask=n_mask, other=0)[None, :]
        tot += tot2
        w_scale2 = tl.load(w_scale_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tot2.to(tl.float32) * (a_scale2 * w_scale2)[None, :]

    # epilogue: zero-point correction and scales done above; bias; store
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if RETURN_ACC:
        tl.store(out_ptrs, tot, mask=out_mask)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def swap_ab(M: int, bits: int) -> bool:
    """Weight tile as the MMA's left operand: for packed weights, and for small M (see the module docstring)."""
    return bits != 8 or M < 128


def gemm_a8(
    x: torch.Tensor,
    weight: PackedWeight,
    act_scale: float | tuple[float, float],
    act_zp: int | tuple[int, int],
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
    out_dtype: torch.dtype = torch.float16,
    return_acc: bool = False,
    swap: bool | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """``x [M, K]`` int8 codes or float -> ``[M, N]``; same contract as :func:`kernels.reference.gemm_a8`.

    ``swap`` overrides :func:`swap_ab` (the GEMM benchmark measures both orientations); ``tma`` overrides
    :func:`kernels.gemm_a8_tma.use_tma` (True: the TMA kernel, for shapes it can take).
    """
    parts = act_parts(weight, act_scale, act_zp)
    for _, _, s, z in parts:
        check_act_params(s, z, act_bits)
    _check(x, weight, bias)
    if x.dtype != torch.int8:  # quantize a float x, part by part, into one int8 operand
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        for a, b, s, z in parts:
            quantize_act(x[:, a:b], s, z, act_bits, out=codes[:, a:b])
        x = codes
    (_, _, s1, z1), (_, _, s2, z2) = parts[0], parts[-1]
    act = {
        "a_scale1": s1,
        "a_corr1": ACT_OFFSET - z1,
        "a_scale2": s2,
        "a_corr2": ACT_OFFSET - z2,
        "a_params_ptr": weight.scale,
    }
    return _launch(x, weight, bias, out_dtype, return_acc, swap, act, act_from_ptr=False, tma=tma)


def gemm_a8_codes(
    x: torch.Tensor,
    weight: PackedWeight,
    act_params: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    return_acc: bool = False,
    swap: bool | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """:func:`gemm_a8` of int8 codes with the quantizers read from ``act_params``, a float32 ``[3, P]`` tensor
    of rows ``(1 / s, zp, s)`` (:func:`kernels.reference.act_params_tensor`) on x's device.

    Why: Dynamo guards on Python numbers it reads, so per-layer scales passed as launch arguments made every
    copy of a repeated block compile on its own; as a tensor they are data, and one compiled block serves all.
    """
    _check(x, weight, bias)
    if x.dtype != torch.int8:
        raise TypeError(f"x must be int8 codes here, got {x.dtype}")
    parts = len(part_bounds(weight.in_features, weight.k_split)) - 1
    if act_params.shape != (3, parts) or act_params.dtype != torch.float32 or not act_params.is_contiguous():
        raise ValueError(f"act_params must be a contiguous float32 [3, {parts}] tensor, got {act_params.dtype} "
                         f"{tuple(act_params.shape)}")  # fmt: skip
    act = {"a_scale1": 1.0, "a_corr1": 0, "a_scale2": 1.0, "a_corr2": 0, "a_params_ptr": act_params}
    return _launch(x, weight, bias, out_dtype, return_acc, swap, act, act_from_ptr=True, tma=tma)


def _check(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> None:
    _M, K = x.shape
    if K != weight.in_features:
        raise ValueError(f"x has K={K} columns but the weight has in_features={weight.in_features}")
    if x.dtype not in (torch.int8, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be int8 codes or float16/bfloat16/float32, got {x.dtype}")
    if bias is not None and bias.shape != (weight.out_features,):
        raise ValueError(f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}")


def _launch(x, weight: PackedWeight, bias, out_dtype, return_acc: bool, swap, act: dict, act_from_ptr: bool, tma=None):
    """Allocate the output and launch :func:`gemm_a8_kernel` on int8 codes ``x`` (or, for large 8-bit GEMMs on
    Hopper, :func:`kernels.gemm_a8_tma.gemm_a8_tma`)."""
    M, K = x.shape
    N = weight.out_features
    if tma is None:
        tma = not return_acc and not swap and gemm_a8_tma.use_tma(x, weight, device_sms(x))
    if tma:
        a_params = act["a_params_ptr"] if act_from_ptr else None
        return gemm_a8_tma.gemm_a8_tma(
            x, weight, bias, out_dtype, act["a_scale1"], act["a_corr1"], a_params, device_sms(x)
        )
    out = torch.empty(M, N, dtype=torch.int32 if return_acc else out_dtype, device=x.device)
    k_split = weight.k_split if weight.k_split is not None else K
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    launch_gemm(
        gemm_a8_kernel, grid, M, N, device_sms(x),
        x, weight.data, weight.scale, weight.rowsum, bias if bias is not None else weight.scale, out,
        M, N, K, k_split, weight.part_byte_offsets()[1],
        x.stride(0), x.stride(1), weight.data.stride(0), weight.data.stride(1), out.stride(0), out.stride(1),
        act["a_scale1"], act["a_corr1"], act["a_scale2"], act["a_corr2"], act["a_params_ptr"],
        W_BITS=weight.bits, HAS_SPLIT=weight.k_split is not None, HAS_BIAS=bias is not None, RETURN_ACC=return_acc,
        SWAP_AB=swap_ab(M, weight.bits) if swap is None else swap, ACT_FROM_PTR=act_from_ptr,
    )  # fmt: skip
    return out
