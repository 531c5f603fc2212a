"""Packed int4 / int2 weight -> float weight ``codes * scale`` (the dequant paths) or bare codes in FP8 e4m3
(the FP8 paths), one Triton kernel.

    out[n, k] = float16(float32(u[n, k] - 2**(bits-1)) * scale[n])        (u: the stored offset-binary code)
    out[n, k] = e4m3(u[n, k] - 2**(bits-1))                               (scale None: exact, |code| <= 8)

Why a kernel of our own: under torch.compile the same formula in PyTorch ops became an Inductor kernel that
loads one byte per output element with per-element index arithmetic (shift and chunk position from k); on an
H200 it ran ~4x slower than its memory traffic allows (35.6 us for the 10240x1280 weight; 6.8 ms of unpacking
per 1024 px SDXL step at W4A16, bench/results/gpu_unet_h200_2026-11-28.md, session 5). Here a program loads a
whole 128-code chunk of BLOCK_N rows as contiguous bytes and writes each of its 2 (4) K-slices with one
shift and mask, like the GEMMs' inner loop (layout: :mod:`kernels.pack`). Results equal
:meth:`kernels.pack.PackedWeight.dequantize` bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.pack import PACK_CHUNK, part_bounds, part_byte_offsets

CHUNK = tl.constexpr(PACK_CHUNK)
BLOCK_N = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64


@triton.jit
def unpack_dequant_kernel(
    p_ptr, scale_ptr, out_ptr,
    N, K_PART, byte0, col0, stride_pn, stride_on,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows x one 128-code chunk of one K part (bytes from ``byte0``, columns from ``col0``).

    ``SCALED`` False: the codes themselves are written (``scale_ptr`` unused)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    SLICE: tl.constexpr = CHUNK // PER_BYTE  # codes per slice = bytes per chunk
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    offs_j = tl.arange(0, SLICE)
    row_mask = rows < N
    p = tl.load(p_ptr + rows[:, None] * stride_pn + (byte0 + chunk * SLICE + offs_j)[None, :], mask=row_mask[:, None])
    p = p.to(tl.int32)
    if SCALED:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    for i in tl.static_range(PER_BYTE):
        k = chunk * CHUNK + i * SLICE + offs_j
        q = ((p >> (i * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        w = q.to(tl.float32)
        if SCALED:
            w = w * scale[:, None]
        mask = row_mask[:, None] & (k < K_PART)[None, :]
        w = w.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + rows[:, None] * stride_on + (col0 + k)[None, :], w, mask=mask)


def unpack_dequant(
    data: torch.Tensor, scale: torch.Tensor | None, bits: int, k: int, k_split: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, k]`` tensor of ``dtype`` from packed 4- or 2-bit ``data`` and per-row ``scale`` (see the module doc);
    ``scale=None`` writes the codes unscaled (used with ``dtype=torch.float8_e4m3fn``)."""
    if bits not in (4, 2):
        raise ValueError(f"unpack_dequant takes 4- or 2-bit packed weights, got {bits} bits")
    n = data.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=data.device)
    bounds, offsets = part_bounds(k, k_split), part_byte_offsets(k, bits, k_split)
    for (a, b), byte0 in zip(zip(bounds, bounds[1:]), offsets):
        chunks = -(-(b - a) // PACK_CHUNK)
        grid = (triton.cdiv(n, BLOCK_N), chunks)
        unpack_dequant_kernel[grid](
            data,
            data if scale is None else scale,
            out,
            n,
            b - a,
            byte0,
            a,
            data.stride(0),
            out.stride(0),
            BITS=bits,
            BLOCK_N=BLOCK_N,
            SCALED=scale is not None,
        )
    return out
