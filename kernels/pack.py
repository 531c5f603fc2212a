"""Packing of low-bit weight codes, and the packed-weight container every kernel takes.

Weight codes are per-output-channel symmetric integers ``q`` in ``[-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``
(8 -> 127, 4 -> 7, 2 -> 1), stored row-major as the ``nn.Linear`` weight ``[N, K]`` (N out, K in).

* 8 bits: ``int8 [N, K]``, the codes themselves.
* 4 and 2 bits: ``uint8 [N, packed_row_bytes(K, bits, k_split)]``, packed **along K in chunks of
  PACK_CHUNK = 128 codes** ("planar" layout). A code is stored offset-binary, ``u = q + 2**(bits-1)``
  (int4: 1..15 around 8, int2: 1..3 around 2), so unpacking is shift, mask, subtract. A chunk of 128 codes
  is ``P = 128 * bits / 8`` bytes (int4: 64, int2: 32); byte j of a chunk holds the codes at chunk
  positions ``j, j + P', j + 2P', ...`` (``P' = 128 / codes per byte``: 64 for int4, 32 for int2), the first
  in the lowest bits::

      int4, byte j of a chunk:   bit 7 ........ 4   3 ........ 0
                                   [ u[j + 64] ]    [   u[j]   ]

      int2, byte j of a chunk:   bit 7 6     5 4     3 2     1 0
                                   [u[j+96]] [u[j+64]] [u[j+32]] [u[j]]

  So the kernels unpack a whole chunk into 2 (4) contiguous K-slices of 64 (32) codes with one shift and
  mask each, and multiply each slice with its own slice of activations: no register shuffles. Each K part
  (see ``k_split``) is padded to whole chunks with code 0 (u = offset), which adds nothing to a row sum; the
  second part's bytes start right after the first part's.

Convolution weights ``[N, C, kh, kw]`` are flattened in ``(kh, kw, C)`` order (``conv_weight_matrix``) to match
channels-last im2col columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# mixdq.config.WEIGHT_BITS in the kernels' order (kernels import nothing from mixdq; tests/test_architecture.py
# checks the two agree).
WEIGHT_BITS = (8, 4, 2)


def qmax(bits: int) -> int:
    """Largest symmetric weight code at ``bits`` (8 -> 127, 4 -> 7, 2 -> 1)."""
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")


PACK_CHUNK = 128  # codes per packed chunk along K (4- and 2-bit weights)


def part_bounds(k: int, k_split: int | None) -> list[int]:
    """``[0, K]`` or ``[0, k_split, K]``: the K parts that are packed (and activation-quantized) separately."""
    return [0, k] if k_split is None else [0, k_split, k]


def chunk_bytes(bits: int) -> int:
    """Bytes of one packed chunk of PACK_CHUNK codes (int4: 64, int2: 32)."""
    return PACK_CHUNK * bits // 8


def part_byte_offsets(k: int, bits: int, k_split: int | None = None) -> list[int]:
    """Byte offset within a packed row where each K part starts, then the row length (8 bits: code offsets)."""
    offsets = [0]
    for a, b in itertools.pairwise(part_bounds(k, k_split)):
        offsets.append(offsets[-1] + (b - a if bits == 8 else -(-(b - a) // PACK_CHUNK) * chunk_bytes(bits)))
    return offsets


def packed_row_bytes(k: int, bits: int, k_split: int | None = None) -> int:
    """Bytes per output channel of packed codes (K for 8 bits; whole 128-code chunks per K part otherwise)."""
    return part_byte_offsets(k, bits, k_split)[-1]


def pack_codes(q: torch.Tensor, bits: int, k_split: int | None = None) -> torch.Tensor:
    """Pack int8 codes ``[N, K]`` in ``[-qmax, qmax]``: int8 ``[N, K]`` (8 bits) or the planar uint8 chunks."""
    _check_bits(bits)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if bits == 8:
        return q.contiguous()
    per_byte, offset = 8 // bits, 2 ** (bits - 1)
    n = q.shape[0]
    parts = []
    for a, b in itertools.pairwise(part_bounds(q.shape[1], k_split)):
        u = (q[:, a:b].to(torch.int32) + offset).to(torch.uint8)
        u = torch.nn.functional.pad(u, (0, -(b - a) % PACK_CHUNK), value=offset)
        u = u.view(n, -1, per_byte, PACK_CHUNK // per_byte)  # [N, chunk, slice i, byte j]
        packed = torch.zeros(n, u.shape[1], u.shape[3], dtype=torch.uint8, device=q.device)
        for i in range(per_byte):
            packed |= u[:, :, i] << (i * bits)
        parts.append(packed.reshape(n, -1))
    return torch.cat(parts, dim=1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int, k_split: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes ``[N, k]``."""
    _check_bits(bits)
    if bits == 8:
        return packed[:, :k]
    per_byte, offset = 8 // bits, 2 ** (bits - 1)
    n = packed.shape[0]
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = []
    bounds, offsets = part_bounds(k, k_split), part_byte_offsets(k, bits, k_split)
    for (a, b), (start, end) in zip(itertools.pairwise(bounds), itertools.pairwise(offsets)):
        chunks = packed[:, start:end].reshape(n, -1, 1, chunk_bytes(bits))  # [N, chunk, 1, byte j]
        u = (chunks >> shifts[:, None]) & (2**bits - 1)  # [N, chunk, slice i, byte j]
        codes.append(u.reshape(n, -1)[:, : b - a].to(torch.int8) - offset)
    return torch.cat(codes, dim=1).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per byte, planar 128-code chunks along K (see the module docstring)."""
    return pack_codes(q, 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_codes(packed, 4, k)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """Four int2 (ternary) codes per byte, planar 128-code chunks along K (see the module docstring)."""
    return pack_codes(q, 2)


def unpack_int2(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_codes(packed, 2, k)


def conv_weight_matrix(q: torch.Tensor) -> torch.Tensor:
    """Conv codes ``[N, C, kh, kw]`` -> ``[N, kh*kw*C]`` in (kh, kw, C) order, the channels-last im2col order."""
    return q.permute(0, 2, 3, 1).reshape(q.shape[0], -1)


def _check_exact_in_e4m3(weights: list[PackedWeight]) -> None:
    if any(w.bits == 8 for w in weights):
        raise ValueError("8-bit codes are not exact in e4m3; FP8 8-bit layers re-quantize their weights instead")


@dataclass
class PackedWeight:
    """A quantized weight as the kernels read it.

    data:    int8 [N, K] (8 bits) or uint8 [N, packed_row_bytes(K, bits, k_split)] (4, 2 bits), row-major,
             packed along K in planar 128-code chunks, each K part padded to whole chunks.
    scale:   float16 or float32, one per output channel and K part: ``[N]`` (W ~= q * scale[:, None]), or
             ``[2, N]`` when ``k_split`` is set (columns of part p use row ``scale[p]``: MixDQ's two weight
             quantizers of a split shortcut, one per input slice; :meth:`part_scales`).
    rowsum:  int32 [P, N], sum_k q[n, k] over each of the P K-parts (P = 1, or 2 when ``k_split`` is set);
             the A8 epilogue folds the activation zero-point with it.
    k_split: None, or the K index where a second input part starts (the up-block ``conv_shortcut`` concat:
             columns [0, k_split) and [k_split, K) have their own activation scale and zero-point, and their
             own weight scales).
    """

    data: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    bits: int
    in_features: int
    k_split: int | None = None

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bits: int, k_split: int | None = None) -> PackedWeight:
        """Pack int8 codes ``[N, K]`` (from the fake-quant layer) with their per-channel ``scale``: ``[N]``, or
        ``[2, N]`` (one row per K part) with a ``k_split``."""
        _check_bits(bits)
        n, k = q.shape
        if q.numel() and int(q.to(torch.int16).abs().max()) > qmax(bits):
            raise ValueError(f"codes exceed [-{qmax(bits)}, {qmax(bits)}] for {bits}-bit weights")
        if k_split is not None and not 0 < k_split < k:
            raise ValueError(f"k_split must lie in (0, {k}), got {k_split}")
        shape = (n,) if k_split is None else (2, n)
        if tuple(scale.shape) != shape or scale.dtype not in (torch.float16, torch.float32):
            raise ValueError(
                f"scale must be float16/float32 of shape {shape} (one row per K part), got {scale.dtype} "
                f"{tuple(scale.shape)}"
            )
        bounds = part_bounds(k, k_split)
        rowsum = torch.stack([q[:, a:b].to(torch.int32).sum(1) for a, b in itertools.pairwise(bounds)])
        return cls(pack_codes(q, bits, k_split), scale.contiguous(), rowsum.to(torch.int32), bits, k, k_split)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def num_parts(self) -> int:
        """K parts with their own activation quantizer, row sums and weight scales (1, or 2 with a k_split)."""
        return 1 if self.k_split is None else 2

    def part_scales(self) -> tuple[torch.Tensor, ...]:
        """The ``[N]`` weight scales of each K part, in order (views of :attr:`scale`)."""
        return tuple(self.scale.reshape(self.num_parts, -1).unbind(0))

    def codes(self) -> torch.Tensor:
        """Unpacked int8 codes ``[N, K]``."""
        return unpack_codes(self.data, self.bits, self.in_features, self.k_split)

    def dequantize(self, dtype: torch.dtype, backend: str = "torch") -> torch.Tensor:
        """``codes * scale`` as a ``[N, K]`` float tensor of ``dtype`` (computed in float32, rounded once):
        the fake-quant layer's weight, made per call by the dequantizing paths (:mod:`kernels.dequant`).

        ``backend="triton"`` unpacks 4- and 2-bit codes with :mod:`kernels.unpack` (the same numbers, at the
        memory's speed on a GPU); 8-bit codes and ``"torch"`` use PyTorch ops.
        """
        if backend == "triton" and self.bits != 8:
            import kernels.ops  # noqa: F401 (registers torch.ops.mixdq.*)

            split = -1 if self.k_split is None else self.k_split
            return torch.ops.mixdq.unpack_dequant(self.data, self.scale, self.bits, self.in_features, split, dtype)
        codes, bounds = self.codes(), part_bounds(self.in_features, self.k_split)
        parts = [
            codes[:, a:b].float() * s.float()[:, None]
            for (a, b), s in zip(itertools.pairwise(bounds), self.part_scales())
        ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(dtype)

    def codes_fp8(self, backend: str = "torch") -> torch.Tensor:
        """The integer codes ``[N, K]`` as FP8 e4m3, exact for 4- and 2-bit weights (every integer up to 16 is an
        e4m3 value): the FP8 paths multiply them on FP8 tensor cores and apply ``scale`` per output channel.

        ``backend="triton"``: one :mod:`kernels.unpack` kernel (1 byte written per code); ``"torch"``: PyTorch ops.
        """
        _check_exact_in_e4m3([self])
        if backend == "triton":
            import kernels.ops  # noqa: F401 (registers torch.ops.mixdq.*)

            split = -1 if self.k_split is None else self.k_split
            return torch.ops.mixdq.unpack_codes_fp8(self.data, self.bits, self.in_features, split)
        return self.codes().to(torch.float8_e4m3fn)

    @staticmethod
    def codes_fp8_group(weights: list[PackedWeight], backend: str = "torch") -> torch.Tensor:
        """:meth:`codes_fp8` of several 4- / 2-bit weights, each flattened, concatenated in order into one 1-D
        tensor: weight i's codes are the ``[N_i, K_i]`` view of its slice.

        ``backend="triton"``: one launch of :mod:`kernels.unpack`'s grouped kernel for all of them (a small
        unpacking launch per layer costs more than its memory traffic on a GPU); weights with a ``k_split``
        are refused there (one K part each)."""
        _check_exact_in_e4m3(weights)
        if backend == "triton":
            return PackedWeight._group_op(weights, [], torch.float8_e4m3fn)
        return torch.cat([w.codes().flatten() for w in weights]).to(torch.float8_e4m3fn)

    @staticmethod
    def dequantize_group(weights: list[PackedWeight], dtype: torch.dtype, backend: str = "torch") -> torch.Tensor:
        """:meth:`dequantize` of several 4- / 2-bit weights, flattened and concatenated in order (as
        :meth:`codes_fp8_group`); ``backend="triton"``: one grouped launch, the same numbers bit for bit."""
        if backend == "triton":
            return PackedWeight._group_op(weights, [w.scale for w in weights], dtype)
        return torch.cat([w.dequantize(dtype).flatten() for w in weights])

    @staticmethod
    def _group_op(weights: list[PackedWeight], scales: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        import kernels.ops  # noqa: F401 (registers torch.ops.mixdq.*)

        if any(w.k_split is not None or w.bits == 8 for w in weights):
            raise ValueError("the grouped unpacking takes 4- and 2-bit weights without a k_split")
        data, bits, ks = [w.data for w in weights], [w.bits for w in weights], [w.in_features for w in weights]
        return torch.ops.mixdq.unpack_group(data, scales, bits, ks, dtype)

    def part_byte_offsets(self) -> list[int]:
        """Where each K part's packed bytes start in a row (see :func:`part_byte_offsets`)."""
        return part_byte_offsets(self.in_features, self.bits, self.k_split)

    def nbytes(self) -> int:
        """Exact bytes held: packed codes, scales and row sums."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.rowsum))

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(
            self.data.to(device),
            self.scale.to(device),
            self.rowsum.to(device),
            self.bits,
            self.in_features,
            self.k_split,
        )
