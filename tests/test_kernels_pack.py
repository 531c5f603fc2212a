"""Packing of int4 / int2 weight codes and the PackedWeight container (pure PyTorch, no Triton)."""

import pytest
import torch

from kernels import PackedWeight, pack_codes, pack_int2, pack_int4, unpack_codes, unpack_int2, unpack_int4
from kernels.pack import qmax


def random_codes(n: int, k: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-qmax(bits), qmax(bits) + 1, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("k", [1, 3, 8, 13, 64])
def test_pack_round_trip_exact(bits, k):
    q = random_codes(5, k, bits)
    packed = pack_codes(q, bits)
    assert packed.shape == (5, -(-k * bits // 8))
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(unpack_codes(packed, bits, k), q)


def test_int4_layout_low_nibble_first():
    # codes -7, 7 -> offset-binary 1, 15 -> byte 0xF1; odd K pads with code 0 (nibble 8)
    q = torch.tensor([[-7, 7, 0, 3, -1]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0xB8, 0x87]]
    assert torch.equal(unpack_int4(pack_int4(q), 5), q)


def test_int2_layout_lowest_pair_first():
    # ternary -1, 0, 1, 1 -> 1, 2, 3, 3 -> 0b11_11_10_01; the second byte is one code (0) then padding (2s)
    q = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)
    assert pack_int2(q).tolist() == [[0b11111001, 0b10101010]]
    assert torch.equal(unpack_int2(pack_int2(q), 5), q)


def test_packed_weight_rowsums_and_bytes():
    q = random_codes(6, 20, 4)
    scale = torch.rand(6) + 0.1
    pw = PackedWeight.from_codes(q, scale, 4, k_split=8)
    expected = torch.stack([q[:, :8].int().sum(1), q[:, 8:].int().sum(1)])
    assert torch.equal(pw.rowsum, expected)
    assert torch.equal(pw.codes(), q)
    assert pw.nbytes() == 6 * 10 + 6 * 4 + 2 * 6 * 4  # codes, fp32 scales, two int32 row sums
    assert pw.out_features == 6 and pw.in_features == 20


def test_packed_weight_rejects_bad_input():
    q = random_codes(4, 8, 8)
    with pytest.raises(ValueError, match="weight bits must be one of"):
        PackedWeight.from_codes(q, torch.ones(4), 3)
    with pytest.raises(ValueError, match=r"exceed \[-7, 7\]"):
        PackedWeight.from_codes(q, torch.ones(4), 4)
    with pytest.raises(ValueError, match="k_split"):
        PackedWeight.from_codes(q, torch.ones(4), 8, k_split=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedWeight.from_codes(random_codes(4, 8, 2), torch.ones(4), 2, k_split=3)
    with pytest.raises(ValueError, match="scale"):
        PackedWeight.from_codes(q, torch.ones(3), 8)
