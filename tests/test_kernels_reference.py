"""The integer reference (the CPU path of the deploy layer) against plain float fake-quant math."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import PackedWeight, conv2d_quant, conv_weight_matrix, quant_linear, quantize_act, reference


def fake_quant_act(x: torch.Tensor, scale: float, zp: int, bits: int = 8) -> torch.Tensor:
    """Per-tensor asymmetric fake quantization, computed in float64 from the same codes."""
    q = torch.clamp(torch.round(x.float() * (1.0 / torch.tensor(scale))) + zp, 0, 2**bits - 1)
    return (q.double() - zp) * torch.tensor(scale, dtype=torch.float32).double()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum().clamp_min(1e-30)))


def test_quantize_act_folds_zero_point_and_rounds_half_even():
    # x / s = -0.5, 0.5, 1.5, 2.5 -> round half even -> -0, 0, 2, 2; zp = 3; then clamping at 0 and 255
    x = torch.tensor([-0.125, 0.125, 0.375, 0.625, -100.0, 100.0])
    q = reference.quantize_act(x, 0.25, 3)
    assert q.tolist() == [3 - 128, 3 - 128, 5 - 128, 5 - 128, -128, 127]
    assert reference.quantize_act(x, 0.25, 3, bits=4).tolist() == [3 - 128, 3 - 128, 5 - 128, 5 - 128, -128, 15 - 128]
    with pytest.raises(ValueError, match="zero-point"):
        reference.quantize_act(x, 0.25, 256)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a8_reference_equals_float_fake_quant(bits):
    g = torch.Generator().manual_seed(bits)
    x, w, bias = torch.randn(9, 40, generator=g) * 2, torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    q, s = reference.quantize_weight(w, bits)
    expected = fake_quant_act(x, 0.03, 131) @ (q.double() * s.double()[:, None]).T + bias.double()
    weight = PackedWeight.from_codes(q, s, bits)
    y = quant_linear(x, weight, 0.03, 131, bias, backend="torch")
    assert y.dtype == torch.float32  # a float32 model keeps float32 outputs (the CPU path of deployed layers)
    assert sqnr_db(expected, y) > 120  # only the fp32 epilogue separates the two
    y16 = quant_linear(reference.quantize_act(x, 0.03, 131), weight, 0.03, 131, bias, backend="torch")
    assert y16.dtype == torch.float16  # int8 codes in: float16 out, so fp16 output rounding (~66 dB) on top
    assert sqnr_db(expected, y16) > 60


def test_a8_concat_parts_use_their_own_scale_and_zero_point():
    g = torch.Generator().manual_seed(1)
    x1, x2, w = torch.randn(7, 16, generator=g), torch.randn(7, 24, generator=g) * 20, torch.randn(12, 40, generator=g)
    q, s = reference.quantize_weight(w, 8, k_split=16)  # [2, 12] scales, one row per part
    xdq = torch.cat([fake_quant_act(x1, 0.02, 128), fake_quant_act(x2, 0.3, 20)], dim=1)
    expected = xdq @ torch.cat([q[:, :16].double() * s[0].double()[:, None], q[:, 16:] * s[1].double()[:, None]], 1).T
    pw = PackedWeight.from_codes(q, s, 8, k_split=16)
    y = quant_linear(torch.cat([x1, x2], 1), pw, (0.02, 0.3), (128, 20), backend="torch")
    assert sqnr_db(expected, y) > 60
    q1, q2 = reference.quantize_act(x1, 0.02, 128).int() + 128, reference.quantize_act(x2, 0.3, 20).int() + 128
    centered = torch.cat([q1 - 128, q2 - 20], 1)  # unsigned codes minus each part's zero-point
    acc = reference.gemm_a8(torch.cat([x1, x2], 1), pw, (0.02, 0.3), (128, 20), return_acc=True)
    assert torch.equal(acc, reference.int_matmul(centered, q))
    with pytest.raises(ValueError, match="2 input part"):
        quant_linear(torch.cat([x1, x2], 1), pw, 0.02, 128, backend="torch")


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
@pytest.mark.parametrize("act", [True, False])
def test_conv_reference_equals_float_conv(kernel, stride, padding, act):
    g = torch.Generator().manual_seed(kernel + stride)
    x, w = torch.randn(2, 8, 7, 6, generator=g), torch.randn(10, 8, kernel, kernel, generator=g)
    q4, s = reference.quantize_weight(w.flatten(1), 4)
    w_dq = q4.float().view_as(w) * s[:, None, None, None]
    pw = PackedWeight.from_codes(conv_weight_matrix(q4.view_as(w)), s, 4)
    bias = torch.randn(10, generator=g)
    if act:
        expected = F.conv2d(fake_quant_act(x, 0.02, 100).float(), w_dq, bias, stride, padding)
        y = conv2d_quant(x, pw, kernel, stride, padding, 0.02, 100, bias, backend="torch")
    else:
        expected = F.conv2d(x.half().float(), w_dq, bias, stride, padding)
        y = conv2d_quant(x.half(), pw, kernel, stride, padding, bias=bias, backend="torch")
    assert y.shape == expected.shape
    assert sqnr_db(expected, y) > 60


def test_quantize_act_writes_into_a_strided_slice():
    x = torch.randn(3, 5, 8)
    buf = torch.zeros(3, 5, 12, dtype=torch.int8)
    quantize_act(x, 0.1, 7, out=buf[..., 4:], backend="torch")
    assert torch.equal(buf[..., 4:], reference.quantize_act(x, 0.1, 7))
    assert not buf[..., :4].any()


def test_importing_kernels_does_not_import_triton():
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])


def test_act_codes_equal_the_fake_quant_layers_codes():
    """The deploy contract: kernels' activation codes are mixdq.quant's codes, shifted by -128."""
    from mixdq.quant import primitives

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3
    for bits in (8, 4):
        act_range = torch.tensor([-2.7, 5.1])
        scale, zp = primitives.act_qparams(act_range, bits)
        expected = primitives.quantize_act(x, act_range, bits) - 128
        assert torch.equal(reference.quantize_act(x, float(scale), int(zp), bits).int(), expected)


def test_inv_scale_is_the_float32_reciprocal_torch_computes():
    """The plain-Python reciprocal (foldable by torch.compile) equals torch's float32 division bit for bit."""
    generator = torch.Generator().manual_seed(0)
    scales = (10 ** (torch.rand(5000, generator=generator, dtype=torch.float64) * 11 - 8)).tolist()
    for scale in [*scales, 1.0, 3.0, 0.1, 2.0**-20]:
        assert reference.inv_scale(scale) == float(1.0 / torch.tensor(scale, dtype=torch.float32))
