"""Packing of low-bit weight codes, and the packed-weight container every kernel takes.

Weight codes are per-output-channel symmetric integers ``q`` in ``[-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``
(8 -> 127, 4 -> 7, 2 -> 1), stored row-major as the ``nn.Linear`` weight ``[N, K]`` (N out, K in).

* 8 bits: ``int8 [N, K]``, the codes themselves.
* 4 and 2 bits: ``uint8 [N, ceil(K * bits / 8)]``, packed **along K**, each row padded to whole bytes.
  A code is stored offset-binary, ``u = q + 2**(bits-1)`` (int4: 1..15 around 8, int2: 1..3 around 2),
  so unpacking is shift, mask, subtract. The first code of a byte sits in its lowest bits::

      int4, byte j of a row:   bit 7 ........ 4   3 ........ 0
                                 [ u[2j + 1] ]  [   u[2j]   ]

      int2, byte j of a row:   bit 7 6   5 4   3 2   1 0
                                 [u3]  [u2]  [u1]  [u0]      u_i = u[4j + i]

  Padding codes (k >= K) are 0 (u = offset), so they add nothing to a row sum.

Convolution weights ``[N, C, kh, kw]`` are flattened in ``(kh, kw, C)`` order (``conv_weight_matrix``) to match
channels-last im2col columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

WEIGHT_BITS = (8, 4, 2)


def qmax(bits: int) -> int:
    """Largest symmetric weight code at ``bits`` (8 -> 127, 4 -> 7, 2 -> 1)."""
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``[N, K]`` in ``[-qmax, qmax]`` along K: int8 ``[N, K]`` (8 bits) or uint8 ``[N, ceil(K*bits/8)]``."""
    _check_bits(bits)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if bits == 8:
        return q.contiguous()
    per_byte = 8 // bits
    n, k = q.shape
    u = (q.to(torch.int32) + 2 ** (bits - 1)).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, -k % per_byte), value=2 ** (bits - 1)).view(n, -1, per_byte)
    packed = torch.zeros(u.shape[:2], dtype=torch.uint8, device=q.device)
    for i in range(per_byte):
        packed |= u[:, :, i] << (i * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes ``[N, k]``."""
    _check_bits(bits)
    if bits == 8:
        return packed[:, :k]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    u = (packed[:, :, None] >> shifts) & (2**bits - 1)
    return (u.reshape(packed.shape[0], -1)[:, :k].to(torch.int8) - 2 ** (bits - 1)).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per byte along K (see the module docstring for the layout)."""
    return pack_codes(q, 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_codes(packed, 4, k)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """Four int2 (ternary) codes per byte along K (see the module docstring for the layout)."""
    return pack_codes(q, 2)


def unpack_int2(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_codes(packed, 2, k)


def conv_weight_matrix(q: torch.Tensor) -> torch.Tensor:
    """Conv codes ``[N, C, kh, kw]`` -> ``[N, kh*kw*C]`` in (kh, kw, C) order, the channels-last im2col order."""
    return q.permute(0, 2, 3, 1).reshape(q.shape[0], -1)


@dataclass
class PackedWeight:
    """A quantized weight as the kernels read it.

    data:    int8 [N, K] (8 bits) or uint8 [N, ceil(K*bits/8)] (4, 2 bits), row-major, packed along K.
    scale:   [N] float16 or float32, one per output channel: W ~= q * scale[:, None].
    rowsum:  int32 [P, N], sum_k q[n, k] over each of the P K-parts (P = 1, or 2 when ``k_split`` is set);
             the A8 epilogue folds the activation zero-point with it.
    k_split: None, or the K index where a second input part starts (the up-block ``conv_shortcut`` concat:
             columns [0, k_split) and [k_split, K) have their own activation scale and zero-point).
    """

    data: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    bits: int
    in_features: int
    k_split: int | None = None

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bits: int, k_split: int | None = None) -> PackedWeight:
        """Pack int8 codes ``[N, K]`` (from the fake-quant layer) with their per-channel ``scale [N]``."""
        _check_bits(bits)
        n, k = q.shape
        if q.numel() and int(q.to(torch.int16).abs().max()) > qmax(bits):
            raise ValueError(f"codes exceed [-{qmax(bits)}, {qmax(bits)}] for {bits}-bit weights")
        if scale.shape != (n,) or scale.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"scale must be float16/float32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
        if k_split is not None and not 0 < k_split < k:
            raise ValueError(f"k_split must lie in (0, {k}), got {k_split}")
        if k_split is not None and k_split % (8 // bits):
            raise ValueError(
                f"k_split must be a multiple of {8 // bits} (codes per byte) at {bits} bits, got {k_split}"
            )
        bounds = [0, k] if k_split is None else [0, k_split, k]
        rowsum = torch.stack([q[:, a:b].to(torch.int32).sum(1) for a, b in itertools.pairwise(bounds)])
        return cls(pack_codes(q, bits), scale.contiguous(), rowsum.to(torch.int32), bits, k, k_split)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    def codes(self) -> torch.Tensor:
        """Unpacked int8 codes ``[N, K]``."""
        return unpack_codes(self.data, self.bits, self.in_features)

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
