"""Split up-block shortcuts (issue #23): one weight scale set per input slice, as MixDQ's two weight quantizers.

A split ``conv_shortcut`` is a 1x1 conv on ``cat([hidden, skip])``; channels ``[:c]`` and ``[c:]`` get their own
activation quantizer and their own per-row weight scales, ``(2, out)``. Checked here: fake-quant equals
quantizing each slice on its own; packed / reference / Triton (interpreter on the CPU) agree bit for bit at
W8 / W4 / W2 with A8 and weight-only; memory accounting; the SQNR gain.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import PackedWeight, conv2d_quant, conv_weight_matrix, reference
from kernels.backend import TRITON_INSTALLED
from mixdq.deploy import DeployedConv2d
from mixdq.inventory import LayerInfo
from mixdq.memory import input_parts, layer_weight_bytes
from mixdq.quant.layers import QuantLayer
from mixdq.quant.primitives import fake_quantize_weight, quantize_weight, weight_scales, weight_scales_mse
from mixdq.sensitivity.sweep import sqnr_db

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_INSTALLED or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton cannot launch here (no triton, or no GPU and TRITON_INTERPRET!=1)",
)
IN, SPLIT, OUT = 40, 24, 12
NAME = "up_blocks.1.resnets.0.conv_shortcut"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shortcut(seed: int = 0, skip_gain: float = 1.0) -> nn.Conv2d:
    """A 1x1 conv whose skip-slice weights are ``skip_gain`` times the hidden slice's."""
    conv = nn.Conv2d(IN, OUT, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(OUT, IN, 1, 1, generator=gen(seed)))
        conv.weight[:, SPLIT:] *= skip_gain
    return conv


# ---- fake-quant ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_fake_quant_scales_are_each_slices_own(bits, clip):
    conv = shortcut(seed=bits, skip_gain=0.05)
    layer = QuantLayer(conv, NAME, concat_split=SPLIT)
    layer.weight_clip = clip
    w = conv.weight.detach()
    slices = (w[:, :SPLIT], w[:, SPLIT:])
    own = [weight_scales(s, (bits,))[bits] if clip == "minmax" else weight_scales_mse(s, bits) for s in slices]
    scale = layer.weight_scale(bits)
    assert scale.shape == (2, OUT)
    assert torch.equal(scale, torch.stack(own))
    expected_w = torch.cat([fake_quantize_weight(s, sc, bits) for s, sc in zip(slices, own)], dim=1)
    layer.weight_bits = bits
    x = torch.randn(2, IN, 5, 3, generator=gen(1))
    assert torch.equal(layer(x), F.conv2d(x, expected_w, conv.bias))
    # the skip slice's rows are on a grid ~20x finer than the shared one would be
    assert (scale[1] < 0.2 * scale[0]).all()


def test_unsplit_layers_keep_one_scale_per_row_and_mismatches_are_refused():
    conv = shortcut()
    assert QuantLayer(conv, "conv").weight_scale(4).shape == (OUT,)
    w = conv.weight.detach()
    with pytest.raises(ValueError, match=r"scale of shape \(2, 12\) needs a split"):
        quantize_weight(w, weight_scales(w, (4,), SPLIT)[4], 4)
    with pytest.raises(ValueError, match="needs no split"):
        quantize_weight(w, weight_scales(w, (4,))[4], 4, SPLIT)
    with pytest.raises(ValueError, match=r"split must lie in \(0, 40\)"):
        weight_scales(w, (4,), IN)


# ---- kernels: packed layout, integer reference, Triton ------------------------------------------------
# N = 24 rows, K = 300 with the split at 140 (inside a 128-code chunk: each part packed separately)
N, K, K_SPLIT = 24, 300, 140
ACT = ((2.0**-5, 2.0**-1), (120, 7))  # per-part (scale, zp); powers of two, see split_weight


def split_weight(bits: int, seed: int = 0) -> PackedWeight:
    """Random codes with per-part power-of-two scales, the skip part's 2^6-2^12 smaller.

    Powers of two make every epilogue product ``acc * (s_a * s_w)`` exact, so the float output is the same
    whether a compiler fuses multiply and add or not: outputs can be compared bit for bit, on a GPU too.
    """
    g = gen(seed)
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (N, K), generator=g, dtype=torch.int8)
    exps = torch.stack([torch.randint(-5, -1, (N,), generator=g), torch.randint(-14, -9, (N,), generator=g)])
    return PackedWeight.from_codes(q, torch.pow(2.0, exps.float()), bits, k_split=K_SPLIT)


def dequantized_float64(weight: PackedWeight) -> torch.Tensor:
    q, s = weight.codes().double(), weight.scale.double()
    return torch.cat([q[:, :K_SPLIT] * s[0][:, None], q[:, K_SPLIT:] * s[1][:, None]], dim=1)


def act_codes(m: int, seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, (m, K), generator=gen(seed), dtype=torch.int8)


def centered(codes: torch.Tensor) -> torch.Tensor:
    """``(q - zp) * s_a`` per part in float64: what the A8 GEMM multiplies."""
    (s1, s2), (z1, z2) = ACT
    q = codes.double() + reference.ACT_OFFSET
    return torch.cat([(q[:, :K_SPLIT] - z1) * s1, (q[:, K_SPLIT:] - z2) * s2], dim=1)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_split_weight_holds_a_scale_row_per_part(bits):
    weight = split_weight(bits)
    assert weight.scale.shape == (2, N) and weight.rowsum.shape == (2, N)
    assert [tuple(s.shape) for s in weight.part_scales()] == [(N,), (N,)]
    assert torch.equal(weight.dequantize(torch.float64), dequantized_float64(weight))
    unpacked = PackedWeight.from_codes(weight.codes(), weight.scale, bits, K_SPLIT)
    assert torch.equal(unpacked.data, weight.data)
    # the reference quantizer makes the same layout from a float matrix
    w = dequantized_float64(weight).float()
    q, s = reference.quantize_weight(w, bits, K_SPLIT)
    assert s.shape == (2, N)
    torch.testing.assert_close(q.double() * torch.cat([s[0, :, None].expand(N, K_SPLIT),
                                                         s[1, :, None].expand(N, K - K_SPLIT)], 1).double(),
                               w.double(), rtol=0, atol=float(s.max()) / 2)  # fmt: skip


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_reference_gemms_use_each_parts_scale_row(bits):
    """The integer reference against float64 math on the dequantized weight, A8 and weight-only."""
    weight = split_weight(bits, seed=bits)
    codes = act_codes(9, seed=bits)
    y = reference.gemm_a8(codes, weight, *ACT, out_dtype=torch.float32)
    expected = centered(codes) @ dequantized_float64(weight).T
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    x = torch.randint(-8, 9, (9, K), generator=gen(bits)).half()
    y16 = reference.gemm_a16(x, weight, out_dtype=torch.float32)
    expected16 = x.double() @ dequantized_float64(weight).T
    torch.testing.assert_close(y16.double(), expected16, rtol=1e-6, atol=1e-6 * expected16.abs().max().item())
    # one shared row would be a different layer: the skip part's scales are 2^6+ smaller
    shared = PackedWeight(weight.data, weight.scale[0].contiguous(), weight.rowsum, bits, K)
    assert (reference.gemm_a16(x, shared, out_dtype=torch.float32) - y16).abs().max() > 1.0


@needs_triton
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "no-swap"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_a8_gemm_is_bit_exact_with_the_reference(bits, swap, out_dtype):
    from kernels.gemm_wxa8 import gemm_a8, gemm_a8_codes

    weight = split_weight(bits, seed=bits).to(DEVICE)
    codes = act_codes(33, seed=bits).to(DEVICE)
    bias = (torch.randint(-16, 16, (N,), generator=gen(2)) * 0.25).to(DEVICE)
    ref = reference.gemm_a8(codes, weight, *ACT, bias, out_dtype=out_dtype)
    assert torch.equal(gemm_a8(codes, weight, *ACT, return_acc=True, swap=swap),
                       reference.gemm_a8(codes, weight, *ACT, return_acc=True))  # fmt: skip
    assert torch.equal(gemm_a8(codes, weight, *ACT, bias, out_dtype=out_dtype, swap=swap), ref)
    params = reference.act_params_tensor(weight, *ACT, DEVICE)
    assert torch.equal(gemm_a8_codes(codes, weight, params, bias, out_dtype=out_dtype, swap=swap), ref)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_triton_weight_only_gemm_is_bit_exact_with_the_reference(bits):
    """Two fp32 accumulators, one per part, each scaled by its own row; small-integer x keeps every product
    and partial sum exact, so accumulation order cannot differ."""
    from kernels.gemm_weight_only import gemm_a16

    weight = split_weight(bits, seed=bits).to(DEVICE)
    x = torch.randint(-8, 9, (37, K), generator=gen(bits)).half().to(DEVICE)
    bias = (torch.randint(-16, 16, (N,), generator=gen(3)) * 0.25).to(DEVICE)
    assert torch.equal(gemm_a16(x, weight, bias), reference.gemm_a16(x, weight, bias))
    assert torch.equal(gemm_a16(x, weight), reference.gemm_a16(x, weight))


@needs_triton
@pytest.mark.parametrize("bits", [4, 2])
def test_triton_unpacking_scales_each_part_by_its_row(bits):
    weight = split_weight(bits, seed=bits).to(DEVICE)
    out = weight.dequantize(torch.float16, backend="triton")
    assert torch.equal(out, weight.dequantize(torch.float16, backend="torch"))
    assert torch.equal(out.double().cpu(), dequantized_float64(weight.to("cpu")))  # exact: powers of two


@needs_triton
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("a8", [True, False], ids=["a8", "weight-only"])
def test_triton_split_conv_shortcut_is_bit_exact_with_the_reference(bits, a8):
    """The deployed shortcut's op: a 1x1 conv on the concat, channel split = K split."""
    weight = split_weight(bits, seed=bits).to(DEVICE)
    x = torch.randint(-8, 9, (2, K, 3, 4), generator=gen(bits)).half().to(DEVICE)  # integer-valued: exact for A16 too
    act = {"act_scale": ACT[0], "act_zp": ACT[1]} if a8 else {}
    out = conv2d_quant(x, weight, 1, backend="triton", **act)
    ref = conv2d_quant(x, weight, 1, backend="torch", **act)
    assert out.shape == (2, N, 3, 4) and torch.equal(out, ref)


def test_custom_ops_fake_shapes_read_n_from_the_last_scale_dim():
    """torch.compile's shape-only implementations: a [2, N] scale is N outputs, not 2."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels.ops  # noqa: F401 (registers torch.ops.mixdq.*)

    weight = split_weight(4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        codes, x = torch.empty(5, K, dtype=torch.int8), torch.empty(5, K, dtype=torch.float16)
        data, scale, rowsum = torch.empty_like(weight.data), torch.empty(2, N), torch.empty(2, N, dtype=torch.int32)
        args = (data, scale, rowsum, None)
        a8 = torch.ops.mixdq.gemm_a8(codes, *args, 4, K, K_SPLIT, list(ACT[0]), list(ACT[1]), 8, torch.float16)
        a8_codes = torch.ops.mixdq.gemm_a8_codes(codes, *args, torch.empty(3, 2), 4, K, K_SPLIT, torch.float16)
        a16 = torch.ops.mixdq.gemm_a16(x, *args, 4, K, K_SPLIT)
        unpacked = torch.ops.mixdq.unpack_dequant(data, scale, 4, K, K_SPLIT, torch.float16)
    assert a8.shape == a8_codes.shape == a16.shape == (5, N) and unpacked.shape == (N, K)


# ---- deploy ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("conv_path", ["gemm", "dequant"])
@pytest.mark.parametrize("act_bits", [8, None], ids=["w4a8", "w4a16"])
def test_deployed_shortcut_holds_per_slice_scales_and_matches_fake_quant(conv_path, act_bits):
    conv = shortcut(seed=5, skip_gain=0.05)
    layer = QuantLayer(conv, NAME, concat_split=SPLIT)
    x = torch.cat(
        [torch.randn(2, SPLIT, 4, 4, generator=gen(6)), 20 * torch.randn(2, IN - SPLIT, 4, 4, generator=gen(7))], dim=1
    )
    layer.set_act_range(8, torch.stack([torch.stack(torch.aminmax(p)) for p in x.split([SPLIT, IN - SPLIT], 1)]))
    layer.set_bits(4, act_bits)
    fake = layer(x)
    deployed = DeployedConv2d(layer, "torch", conv_path)
    assert deployed.weight_scale.shape == (2, OUT) and torch.equal(deployed.weight_scale, layer.weight_scale(4))
    expected_codes = conv_weight_matrix(quantize_weight(conv.weight, layer.weight_scale(4), 4, SPLIT))
    assert torch.equal(deployed.packed_weight.codes(), expected_codes)
    torch.testing.assert_close(deployed(x), fake, rtol=1e-5, atol=1e-5 * fake.abs().max().item())


# ---- memory ---------------------------------------------------------------------------------------------
def test_memory_counts_packed_bytes_and_scales_per_input_part():
    def info(split):
        return LayerInfo(NAME, "conv", 48, 96, (48, 96, 1, 1), True, "quality", "up.1", split)

    assert input_parts(info(None)) == (96,) and input_parts(info(64)) == (64, 32)
    # per row: 64 * 4 / 8 + 32 * 4 / 8 packed bytes + 2 FP16 scales; plus the FP16 bias
    assert layer_weight_bytes(info(64), 4) == 48 * (32 + 16 + 2 * 2) + 48 * 2
    assert layer_weight_bytes(info(None), 4) == 48 * (48 + 2) + 48 * 2
    # each part padded to whole bytes on its own: 66 * 2 / 8 -> 17, 30 * 2 / 8 -> 8
    assert layer_weight_bytes(info(66), 2) == 48 * (17 + 8 + 2 * 2) + 48 * 2
    assert layer_weight_bytes(info(64), 8) == 48 * (96 + 2 * 2) + 48 * 2
    assert layer_weight_bytes(info(64), None) == layer_weight_bytes(info(None), None) == 48 * 96 * 2 + 48 * 2


# ---- SQNR -----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_slice_scales_beat_one_scale_when_the_slices_differ(bits):
    """Skip-slice weights 50x smaller reading inputs 50x larger (both parts matter to the output): one shared
    scale rounds the skip slice on the hidden slice's coarse grid; per-slice scales do not."""
    conv = shortcut(seed=7, skip_gain=0.02)
    x = torch.cat(
        [torch.randn(4, SPLIT, 6, 6, generator=gen(8)), 50 * torch.randn(4, IN - SPLIT, 6, 6, generator=gen(9))], dim=1
    )
    reference_out = conv(x)
    single, per_slice = QuantLayer(conv, NAME), QuantLayer(conv, NAME, concat_split=SPLIT)
    single.weight_bits = per_slice.weight_bits = bits
    w = conv.weight
    single_w, per_slice_w = sqnr_db(w, single._fake_quant_weight()), sqnr_db(w, per_slice._fake_quant_weight())
    single_y, per_slice_y = sqnr_db(reference_out, single(x)), sqnr_db(reference_out, per_slice(x))
    print(f"W{bits}: weight {single_w:.2f} -> {per_slice_w:.2f} dB, output {single_y:.2f} -> {per_slice_y:.2f} dB")
    assert per_slice_w >= single_w
    # measured: W8 14.7 -> 46.4, W4 4.4 -> 20.9, W2 (ternary: ~4 dB at best) 2.0 -> 4.1 dB output SQNR
    assert per_slice_y > single_y + {8: 20.0, 4: 10.0, 2: 1.5}[bits]
