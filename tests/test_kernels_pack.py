"""Packing of int4 / int2 weight codes and the PackedWeight container (pure PyTorch, no Triton)."""

import pytest
import torch

from kernels import PackedWeight, pack_codes, pack_int2, pack_int4, unpack_codes, unpack_int2, unpack_int4
from kernels.pack import packed_row_bytes, qmax


def random_codes(n: int, k: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-qmax(bits), qmax(bits) + 1, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("k", [1, 3, 64, 128, 200, 320])
def test_pack_round_trip_exact(bits, k):
    q = random_codes(5, k, bits)
    packed = pack_codes(q, bits)
    # 8 bits: the codes; 4 / 2 bits: whole 128-code chunks of 64 / 32 bytes
    assert packed.shape == (5, k if bits == 8 else -(-k // 128) * 128 * bits // 8)
    assert packed.shape[1] == packed_row_bytes(k, bits)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(unpack_codes(packed, bits, k), q)


def test_int4_layout_planar_chunks():
    # byte j of a chunk: code j in the low nibble, code j + 64 in the high nibble (offset-binary, 0 -> 8)
    q = torch.zeros(1, 130, dtype=torch.int8)
    q[0, 0], q[0, 64], q[0, 1], q[0, 65], q[0, 128] = -7, 7, 3, -1, 5
    packed = pack_int4(q)
    assert packed.shape == (1, 128)  # two chunks; the second holds codes 128, 129 and padding
    assert packed[0, :3].tolist() == [0xF1, 0x7B, 0x88]
    assert packed[0, 64:66].tolist() == [0x8D, 0x88]
    assert torch.equal(unpack_int4(packed, 130), q)


def test_int2_layout_planar_chunks():
    # byte j of a chunk holds codes j, j + 32, j + 64, j + 96, lowest bits first (offset-binary, 0 -> 2)
    q = torch.zeros(1, 128, dtype=torch.int8)
    q[0, 0], q[0, 32], q[0, 64], q[0, 96] = -1, 0, 1, 1
    packed = pack_int2(q)
    assert packed.shape == (1, 32)
    assert packed[0, 0].item() == 0b11_11_10_01 and packed[0, 1].item() == 0b10_10_10_10
    assert torch.equal(unpack_int2(packed, 128), q)


@pytest.mark.parametrize("bits", [4, 2])
def test_k_split_parts_are_packed_separately(bits):
    # an up-block concat split at 320 (not a chunk multiple): each part padded to whole chunks
    q = random_codes(3, 960, bits)
    pw = PackedWeight.from_codes(q, torch.ones(2, 3), bits, k_split=320)
    chunk = 128 * bits // 8
    assert pw.part_byte_offsets() == [0, 3 * chunk, 8 * chunk]
    assert pw.data.shape == (3, 8 * chunk)
    assert torch.equal(pw.codes(), q)
    assert torch.equal(unpack_codes(pw.data[:, 3 * chunk :], bits, 640), q[:, 320:])


def test_packed_weight_rowsums_and_bytes():
    q = random_codes(6, 20, 4)
    scale = torch.rand(2, 6) + 0.1  # one row of scales per K part
    pw = PackedWeight.from_codes(q, scale, 4, k_split=8)
    expected = torch.stack([q[:, :8].int().sum(1), q[:, 8:].int().sum(1)])
    assert torch.equal(pw.rowsum, expected)
    assert torch.equal(pw.codes(), q)
    assert pw.nbytes() == 6 * 2 * 64 + 2 * 6 * 4 + 2 * 6 * 4  # two padded chunks per row, two fp32 scales, two row sums
    assert pw.out_features == 6 and pw.in_features == 20


def test_packed_weight_rejects_bad_input():
    q = random_codes(4, 8, 8)
    with pytest.raises(ValueError, match="weight bits must be one of"):
        PackedWeight.from_codes(q, torch.ones(4), 3)
    with pytest.raises(ValueError, match=r"exceed \[-7, 7\]"):
        PackedWeight.from_codes(q, torch.ones(4), 4)
    with pytest.raises(ValueError, match="k_split"):
        PackedWeight.from_codes(q, torch.ones(4), 8, k_split=8)
    with pytest.raises(ValueError, match="scale"):
        PackedWeight.from_codes(q, torch.ones(3), 8)
    with pytest.raises(ValueError, match=r"shape \(2, 4\) \(one row per K part\)"):
        PackedWeight.from_codes(q, torch.ones(4), 8, k_split=4)
