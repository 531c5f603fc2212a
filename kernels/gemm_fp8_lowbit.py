"""W4A8 / W2A8 on FP8 tensor cores: e4m3 activations x packed int4 / int2 weight codes, unpacked inside the GEMM.

    acc[m, n] = sum_k x[m, k] * q[n, k]                  e4m3 x e4m3 products, float32 accumulator (tl.dot)
    y[m, n]   = acc[m, n] * out_scale[n] + bias[n]       out_scale = weight scale per row x activation scale

x:         [M, K] float8_e4m3fn, row-major (K contiguous): activations already quantized to e4m3 with one
           per-tensor scale (:func:`kernels.fp8.quantize_fp8`, fused into x's producer under torch.compile).
weight:    :class:`kernels.pack.PackedWeight` of 4 or 2 bits, one K part: ``data`` uint8 ``[N, bytes]``, planar
           128-code chunks, offset-binary ``u = q + 2**(bits-1)`` (layout drawn in :mod:`kernels.pack`)::

               int4 chunk, byte j (j < 64):  bits 7..4 = u[j + 64]   bits 3..0 = u[j]
               int2 chunk, byte j (j < 32):  bits 7..6 = u[j + 96]  5..4 = u[j + 64]  3..2 = u[j + 32]  1..0 = u[j]

out_scale: [N] float32.  bias: [N] (any float dtype) or None.  out: [M, N] float16 / bfloat16, row-major.

Why: the path this replaces unpacks every weight to e4m3 in device memory (:mod:`kernels.unpack`, 1 byte per
code written and read back) before cuBLAS's row-wise FP8 GEMM; at 512 px that pass costs about as much as the
GEMMs save over FP16. Here each K step loads a chunk's packed bytes (0.5 / 0.25 byte per code), and slice i of
it becomes codes with one shift, mask and subtract, then e4m3 -- exactly, since every |q| <= 8 is an e4m3
value -- and meets the matching contiguous K-slice of x (64 / 32 codes) in its own ``tl.dot``: no shuffles.
Codes go to e4m3 through float16's exponent trick (``0x6400 | u`` is the float16 ``1024 + u``; subtracting
``1024 + offset`` is exact), avoiding an int -> float conversion per code.

``SWAP_AB`` computes ``out^T = W x^T``: the unpacked weight tile is then wgmma's left operand, which Hopper
reads from registers, and the weight's N fills the MMA's 64-row side when M is small (the 77 text tokens);
otherwise the unpacked tile is wgmma's right operand, staged through shared memory by Triton.

Accumulation: Hopper's FP8 MMA adds into its float32 accumulator with fewer mantissa bits than float32 (what
cuBLAS's ``use_fast_accum`` accepts and Triton's ``tl.dot`` does by default on sm_90). Without ``FAST_ACCUM``
each 128-code chunk's products are summed by the tensor cores into a fresh tile, which is then added to the
accumulator in float32 on the CUDA cores: cuBLAS's default FP8 recipe promotes at the same interval.

A ``k_split`` (two K parts, packed separately) is refused: FP8 low-bit layers are linears
(:func:`mixdq.deploy.check_deployable`), and split inputs are the up-blocks' concat shortcuts, which are convs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.pack import PACK_CHUNK, PackedWeight, packed_row_bytes
from kernels.tiles import autotune_enabled, device_sms, grouped_tile, pick_gemm_config, prune_by_m

CHUNK = tl.constexpr(PACK_CHUNK)  # a jit function may read a global only as a constexpr
# M varies from call to call (tokens) without changing the code worth generating: left unspecialized
PER_CALL_INTS = ["M"]
# below this many rows (tokens) the weight tile is the MMA's left operand (see the module docstring)
SWAP_BELOW_M = 128


def get_fp8_lowbit_autotune_config() -> list[triton.Config]:
    """Tiles the rule (kernels.tiles) and the autotuner choose from; ``SWAP`` marks the tiles of the swapped
    orientation, where BLOCK_N is the MMA's row side (>= 64 for wgmma) and BLOCK_M its column side.

    BLOCK_K is a multiple of the 128-code chunk (one unpack per chunk). Not yet swept on a GPU: candidates
    after the int8 GEMM's sweep (kernels.gemm_wxa8), none of which spills registers for sm_90 (ptxas -v; the
    second accumulator of the exact accumulation made 128x256 with 8 warps and 128x128 with 4 warps spill).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 4, "SWAP": False}),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 4, "SWAP": True}),
        ]
    cfg = lambda m, n, k, w, s, swap: triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "SWAP": swap}, num_warps=w, num_stages=s
    )
    return [
        cfg(128, 128, 128, 8, 4, False),
        cfg(64, 128, 128, 4, 4, False),
        cfg(64, 64, 256, 4, 4, False),
        cfg(64, 128, 256, 8, 3, True),
        cfg(32, 128, 256, 4, 4, True),
        cfg(32, 64, 256, 4, 4, True),
        cfg(16, 64, 256, 4, 4, True),
    ]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The tiles of the launch's orientation (``SWAP_AB``), none much taller than M."""
    swap = kwargs["SWAP_AB"]
    same = [c for c in configs if c.kwargs["SWAP"] == swap]
    return prune_by_m(same, named_args)


@triton.jit
def unpack_slice_e4m3(p, i: tl.constexpr, W_BITS: tl.constexpr):
    """Slice ``i`` of packed bytes ``p`` (int16 tile) as e4m3 codes ``q = u - 2**(W_BITS - 1)``, exact."""
    u = (p >> (i * W_BITS)) & ((1 << W_BITS) - 1)
    magic = (u | 0x6400).to(tl.float16, bitcast=True)  # float16 1024 + u
    return (magic - (1024 + (1 << (W_BITS - 1)))).to(tl.float8e4nv)


@triton.autotune(configs=get_fp8_lowbit_autotune_config(), key=["M", "N", "K", "W_BITS", "SWAP_AB", "FAST_ACCUM"],
                 prune_configs_by={"early_config_prune": prune_configs})  # fmt: skip
@triton.jit(do_not_specialize=PER_CALL_INTS)
def fp8_lowbit_kernel(
    # pointers: x e4m3 [M, K]; w uint8 [N, row bytes]; out_scale float32 [N]; bias [N]; out [M, N]
    x_ptr, w_ptr, out_scale_ptr, bias_ptr, out_ptr,
    # sizes and row strides (elements; the packed weight's in bytes); unit strides along K and N
    M, N, K, stride_xm, stride_wn, stride_om,
    # meta
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, FAST_ACCUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    """One program: out[BLOCK_M rows, BLOCK_N columns]; ``SWAP`` only tags the config (see prune_configs)."""
    PER_BYTE: tl.constexpr = 8 // W_BITS
    SLICE: tl.constexpr = CHUNK // PER_BYTE  # codes per K-slice = bytes per chunk (int4: 64, int2: 32)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, SLICE)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # main loop: BLOCK_K // 128 chunks per step, each PER_BYTE slices of SLICE codes, one dot per slice; without
    # FAST_ACCUM a chunk's dots sum into a fresh tile added to acc on the CUDA cores (module docstring)
    for k0 in range(0, K, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = k0 + c * CHUNK  # first code of this chunk; a chunk exists (is packed) iff kc < K
            byte0 = kc // PER_BYTE
            p = tl.load(w_rows + (byte0 + offs_j)[None, :], mask=n_mask[:, None] & (kc < K), other=0)
            p = p.to(tl.int16)
            if FAST_ACCUM:
                part = acc
            else:
                part = tl.zeros(acc.shape, dtype=tl.float32)
            for i in tl.static_range(PER_BYTE):
                offs_k = kc + i * SLICE + offs_j
                # masked to 0: K's tail inside the last chunk, and whole chunks past K (e4m3 garbage may be NaN)
                a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                w = unpack_slice_e4m3(p, i, W_BITS)
                if SWAP_AB:
                    part = tl.dot(w, tl.trans(a), part)
                else:
                    part = tl.dot(a, tl.trans(w), part)
            if FAST_ACCUM:
                acc = part
            else:
                acc += part
    if SWAP_AB:
        acc = tl.trans(acc)

    # epilogue: per-column scale, bias, cast, store
    out = acc * tl.load(out_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


OUT_DTYPES = (torch.float16, torch.bfloat16)


def swap_ab(M: int) -> bool:
    """Weight tile as the MMA's left operand below :data:`SWAP_BELOW_M` tokens (see the module docstring)."""
    return M < SWAP_BELOW_M


def fp8_lowbit_linear(
    x: torch.Tensor,
    weight: PackedWeight,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    fast_accum: bool = False,
    swap: bool | None = None,
) -> torch.Tensor:
    """``x [M, K]`` e4m3 x packed 4- / 2-bit ``weight [N, K]`` -> ``[M, N]`` in ``out_dtype`` (module docstring).

    ``fast_accum``: the tensor cores' own accumulation throughout (as ``deploy(fp8_fast_accum=True)`` asks of
    cuBLAS). ``swap`` overrides :func:`swap_ab` (tests and the GEMM benchmark run both orientations).
    """
    if weight.k_split is not None:
        raise ValueError(
            f"fp8_lowbit_linear takes weights of one K part (FP8 low-bit layers are linears); got k_split="
            f"{weight.k_split}"
        )
    return fp8_lowbit_launch(
        x, weight.data, weight.bits, weight.in_features, out_scale, bias, out_dtype, fast_accum, swap
    )


def fp8_lowbit_launch(
    x: torch.Tensor,
    data: torch.Tensor,
    bits: int,
    in_features: int,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
    swap: bool | None = None,
) -> torch.Tensor:
    """:func:`fp8_lowbit_linear` on the packed bytes ``data`` (what the custom op passes): (1) check, (2)
    allocate, (3) launch."""
    if bits not in (4, 2):
        raise ValueError(f"fp8_lowbit_linear takes 4- or 2-bit packed weights, got {bits} bits")
    if x.dtype != torch.float8_e4m3fn or x.dim() != 2:
        raise TypeError(f"x must be a 2-D float8_e4m3fn tensor, got {x.dtype} of shape {tuple(x.shape)}")
    M, K = x.shape
    N = data.shape[0]
    if K != in_features:
        raise ValueError(f"x has K={K} columns but the weight has in_features={in_features}")
    if data.dtype != torch.uint8 or data.shape[1] != packed_row_bytes(K, bits) or data.stride(1) != 1:
        raise ValueError(f"the packed weight must be uint8 [{N}, {packed_row_bytes(K, bits)}] with unit stride "
                         f"along K, got {data.dtype} {tuple(data.shape)}")  # fmt: skip
    if out_scale.shape != (N,) or out_scale.dtype != torch.float32:
        raise ValueError(f"out_scale must be float32 of shape ({N},), got {out_scale.dtype} {tuple(out_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    swap = swap_ab(M) if swap is None else swap
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    args = (x, data, out_scale.contiguous(), out_scale if bias is None else bias, out, M, N, K, x.stride(0),
            data.stride(0), out.stride(0))  # fmt: skip
    meta = {"W_BITS": bits, "HAS_BIAS": bias is not None, "SWAP_AB": swap, "FAST_ACCUM": fast_accum}
    if autotune_enabled():
        fp8_lowbit_kernel[grid](*args, **meta)
    else:
        fp8_lowbit_kernel.fn[grid](*args, **meta, **rule_config(M, N, swap, device_sms(x)).all_kwargs())
    return out


def rule_config(M: int, N: int, swap: bool, sms: int) -> triton.Config:
    """The tile the default rule (:func:`kernels.tiles.pick_gemm_config`) launches this shape with."""
    return pick_gemm_config(prune_configs(fp8_lowbit_kernel.configs, {"M": M}, SWAP_AB=swap), M, N, sms)
