"""Packed int4 / int2 weight -> float weight ``codes * scale`` (the dequant paths) or bare codes in FP8 e4m3
(the FP8 paths): one Triton kernel per weight, and a grouped one for several weights in one launch.

    out[n, k] = float16(float32(u[n, k] - 2**(bits-1)) * scale[n])        (u: the stored offset-binary code)
                (with a K split, columns of part p use row p of a ``[2, N]`` scale)
    out[n, k] = e4m3(u[n, k] - 2**(bits-1))                               (scale None: exact, |code| <= 8)

Why a kernel of our own: under torch.compile the same formula in PyTorch ops became an Inductor kernel that
loads one byte per output element with per-element index arithmetic (shift and chunk position from k); on an
H200 it ran ~4x slower than its memory traffic allows (35.6 us for the 10240x1280 weight; 6.8 ms of unpacking
per 1024 px SDXL step at W4A16, bench/results/gpu_unet_h200_2026-11-28.md, session 5). Here a program loads a
whole 128-code chunk of BLOCK_N rows as contiguous bytes and writes each of its 2 (4) K-slices with one
shift and mask, like the GEMMs' inner loop (layout: :mod:`kernels.pack`). Results equal
:meth:`kernels.pack.PackedWeight.dequantize` bit for bit.

Grouped (:func:`unpack_group`): a launch per small weight left the GPU mostly idle (~450 launches, 1.67 ms per
mixed W4A8 SDXL step on an H200, against ~0.8 ms of memory traffic); one launch for a transformer block's
weights runs the same tile code over all of them, 1.7-2.8x faster (bench/results/unpack_group_h200_2026-11-28.md).
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from kernels.pack import PACK_CHUNK, packed_row_bytes, part_bounds, part_byte_offsets

CHUNK = tl.constexpr(PACK_CHUNK)
BLOCK_N = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64


@triton.jit
def _unpack_tile(
    p_ptr, scale_ptr, out_ptr, row_tile, chunk,
    N, K_PART, byte0, col0, stride_pn, stride_on,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """BLOCK_N rows (from ``row_tile * BLOCK_N``) x 128-code chunk ``chunk`` of one K part (bytes from
    ``byte0``, columns from ``col0``). ``SCALED`` False: the codes themselves are written (``scale_ptr``
    unused)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    SLICE: tl.constexpr = CHUNK // PER_BYTE  # codes per slice = bytes per chunk
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit
def unpack_dequant_kernel(
    p_ptr, scale_ptr, out_ptr,
    N, K_PART, byte0, col0, stride_pn, stride_on,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows x one 128-code chunk of one K part (see :func:`_unpack_tile`)."""
    _unpack_tile(
        p_ptr, scale_ptr, out_ptr, tl.program_id(0), tl.program_id(1),
        N, K_PART, byte0, col0, stride_pn, stride_on, BITS, BLOCK_N, SCALED,
    )  # fmt: skip


@triton.jit
def unpack_group_kernel(
    out_ptr, data, scales, n, k, stride_pn, out_start, tile_start, bits,
    NSEG: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """Several packed weights (tuples of NSEG pointers / sizes / bit widths) -> their ``codes * scale`` (or,
    ``SCALED`` False, bare codes: ``scales`` unused), one after the other in one flat output: weight j's
    ``[n[j], k[j]]`` from element ``out_start[j]``. Program ids ``[tile_start[j], tile_start[j + 1])`` are weight
    j's tiles, row tile-major (see :func:`_unpack_tile`).

    The bit widths are runtime values with both bodies compiled in: as a constexpr tuple, every pattern of
    widths in a block was a kernel of its own to compile (24 patterns in the MixDQ SDXL config)."""
    pid = tl.program_id(0)
    for j in tl.static_range(NSEG):
        if (pid >= tile_start[j]) & (pid < tile_start[j + 1]):
            local = pid - tile_start[j]
            chunks = tl.cdiv(k[j], CHUNK)
            out_j = out_ptr + out_start[j]
            row_tile, chunk = local // chunks, local % chunks
            if bits[j] == 4:
                _unpack_tile(
                    data[j], scales[j], out_j, row_tile, chunk, n[j], k[j], 0, 0, stride_pn[j], k[j], 4, BLOCK_N, SCALED
                )
            else:
                _unpack_tile(
                    data[j], scales[j], out_j, row_tile, chunk, n[j], k[j], 0, 0, stride_pn[j], k[j], 2, BLOCK_N, SCALED
                )


def unpack_dequant(
    data: torch.Tensor, scale: torch.Tensor | None, bits: int, k: int, k_split: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, k]`` tensor of ``dtype`` from packed 4- or 2-bit ``data`` and per-row ``scale`` (``[N]``, or ``[2, N]``
    with a ``k_split``: one row per K part; see the module doc); ``scale=None`` writes the codes unscaled (used
    with ``dtype=torch.float8_e4m3fn``)."""
    if bits not in (4, 2):
        raise ValueError(f"unpack_dequant takes 4- or 2-bit packed weights, got {bits} bits")
    n = data.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=data.device)
    bounds, offsets = part_bounds(k, k_split), part_byte_offsets(k, bits, k_split)
    scales = [None] * (len(bounds) - 1) if scale is None else scale.reshape(len(bounds) - 1, n).unbind(0)
    for (a, b), byte0, part_scale in zip(itertools.pairwise(bounds), offsets, scales):
        chunks = -(-(b - a) // PACK_CHUNK)
        grid = (triton.cdiv(n, BLOCK_N), chunks)
        unpack_dequant_kernel[grid](
            data,
            data if part_scale is None else part_scale,
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


# weights per launch of the grouped kernel: each is a tuple slot (pointer, sizes) of the compiled kernel; a
# BasicTransformerBlock has up to 7 low-bit linears after q / k / v fusion
GROUP_SLOTS = 8
# rows per program and warps of the grouped kernel (bench/lab/unpack_group_probe.py sweeps them on a GPU)
GROUP_BLOCK_N = BLOCK_N
GROUP_WARPS = 4


def unpack_group(
    datas: list[torch.Tensor], scales: list[torch.Tensor] | None, bits: list[int], ks: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Several packed 4- / 2-bit weights (single K part each) as ``codes * scale`` in ``dtype`` (``scales`` None:
    the bare codes, e.g. in e4m3), flattened and concatenated in order into one 1-D tensor, by one kernel launch
    per :data:`GROUP_SLOTS` weights: a block's weights in one launch instead of one small launch each (see
    :func:`mixdq.deploy.unpack_groups.group_unpacking`). Each weight's values equal :func:`unpack_dequant`'s bit
    for bit."""
    if not (len(datas) == len(bits) == len(ks)) or not datas or (scales is not None and len(scales) != len(datas)):
        raise ValueError("unpack_group needs one bit width, one K (and one scale) per packed weight, at least one")
    for data, b, k in zip(datas, bits, ks):
        if b not in (4, 2):
            raise ValueError(f"unpack_group takes 4- or 2-bit packed weights, got {b} bits")
        if data.shape[1] != packed_row_bytes(k, b):
            raise ValueError(f"a packed [{data.shape[0]}, {data.shape[1]}] weight is not one K part of {k} codes")
    sizes = [data.shape[0] * k for data, k in zip(datas, ks)]
    out = torch.empty(sum(sizes), dtype=dtype, device=datas[0].device)
    start = 0
    for first in range(0, len(datas), GROUP_SLOTS):
        group = range(first, min(first + GROUP_SLOTS, len(datas)))
        tiles, out_start = [0], []
        for j in group:
            tiles.append(tiles[-1] + triton.cdiv(datas[j].shape[0], GROUP_BLOCK_N) * triton.cdiv(ks[j], PACK_CHUNK))
            out_start.append(start)
            start += sizes[j]
        unpack_group_kernel[(tiles[-1],)](
            out,
            tuple(datas[j] for j in group),
            tuple((datas if scales is None else scales)[j] for j in group),
            tuple(datas[j].shape[0] for j in group),
            tuple(ks[j] for j in group),
            tuple(datas[j].stride(0) for j in group),
            tuple(out_start),
            tuple(tiles),
            tuple(bits[j] for j in group),
            NSEG=len(group),
            BLOCK_N=GROUP_BLOCK_N,
            SCALED=scales is not None,
            num_warps=GROUP_WARPS,
        )
    return out
