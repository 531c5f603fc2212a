"""Weight and activation quantizer math (mixdq.quant.primitives)."""

import pytest
import torch

from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.quant.primitives import (
    EMA_MOMENTUM,
    act_qmax,
    act_qparams,
    dequantize_act,
    dequantize_weight,
    fake_quantize_act,
    fake_quantize_weight,
    observe_min_max,
    quantize_act,
    quantize_weight,
    weight_qmax,
    weight_scales,
)


def _weight(shape=(16, 8, 3, 3), seed=0) -> torch.Tensor:
    """Rows with magnitudes spread over 3 orders, a zero row and some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[0]).view(-1, *[1] * (len(shape) - 1))
    w[3] = 0.0
    w.view(shape[0], -1)[:, ::5] = 0.0
    return w


def test_qmax_per_bit():
    assert [weight_qmax(b) for b in (2, 4, 8)] == [1, 7, 127]
    assert [act_qmax(b) for b in (4, 8)] == [15, 255]


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (16, 40)])
@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_weight_codes_range_zero_and_error(shape, bits):
    w = _weight(shape)
    scale = weight_scales(w)[bits]
    codes = quantize_weight(w, scale, bits)
    qmax = weight_qmax(bits)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -qmax and int(codes.max()) <= qmax
    # every row's absmax lands exactly on +-qmax (per-channel min-max, no clipping)
    nonzero_rows = w.reshape(shape[0], -1).abs().amax(1) > 0
    assert torch.all(codes.reshape(shape[0], -1).abs().amax(1)[nonzero_rows] == qmax)
    deq = dequantize_weight(codes, scale)
    assert torch.all(deq[w == 0] == 0), "zero must be exactly representable"
    row_scale = scale.view(-1, *[1] * (len(shape) - 1))
    # |dequant - w| <= scale/2, with float32 rounding slack of a few ulps of |w|
    assert torch.all((deq - w).abs() <= row_scale / 2 + 1e-6 * w.abs())
    assert torch.equal(fake_quantize_weight(w, scale, bits), deq)


def test_weight_scales_per_channel_one_pass_and_zero_row():
    w = _weight()
    scales = weight_scales(w)
    assert set(scales) == set(WEIGHT_BITS)
    absmax = w.reshape(w.shape[0], -1).abs().amax(1)
    nonzero = absmax > 0
    for bits, scale in scales.items():
        assert scale.shape == (w.shape[0],)
        # every non-zero row keeps its own scale: the zero-row guard does not overwrite the vector
        torch.testing.assert_close(scale[nonzero], absmax[nonzero] / weight_qmax(bits), rtol=0, atol=0)
        assert scale[3] == 1.0
    # 2-bit is ternary: codes {-1, 0, 1} with scale = absmax (127x the 8-bit scale)
    assert set(quantize_weight(w, scales[2], 2).unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(scales[2][nonzero], absmax[nonzero])


@pytest.mark.parametrize("bits", ACT_BITS)
def test_act_codes_range_zero_and_error(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 9, generator=g) * 3 + 1
    x[0, 0, :4] = 0.0
    act_range = torch.tensor([-5.0, 8.0])
    scale, zero_point = act_qparams(act_range, bits)
    torch.testing.assert_close(scale, torch.tensor(13.0 / (2**bits - 1)))
    assert zero_point.dtype == torch.int32 and int(zero_point) == round(5.0 / float(scale))
    codes = quantize_act(x, act_range, bits)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    deq = dequantize_act(codes, act_range, bits)
    assert torch.all(deq[x == 0] == 0), "zero must be exactly representable"
    inside = (x >= -5.0) & (x <= 8.0)
    assert torch.all((deq - x).abs()[inside] <= scale / 2 + 1e-6)
    # outside the range values clip to the range ends (within one step)
    assert torch.all(deq[~inside].abs() <= 8.0 + scale)
    # the fused fake-quant kernel gives the same numbers as the explicit codes path
    assert torch.equal(fake_quantize_act(x, act_range, bits), deq)
    # also at exact rounding ties (x = (k + 0.5) * scale)
    ties = (torch.arange(-20, 20) + 0.5) * scale
    assert torch.equal(
        fake_quantize_act(ties, act_range, bits), dequantize_act(quantize_act(ties, act_range, bits), act_range, bits)
    )


def test_act_range_widened_to_contain_zero_and_degenerate_range():
    x = torch.tensor([0.0, 2.0, 3.5, 5.0])
    scale, zero_point = act_qparams(torch.tensor([2.0, 5.0]), 8)  # all-positive range -> lo becomes 0
    assert zero_point == 0 and scale == 5.0 / 255
    out = fake_quantize_act(x, torch.tensor([2.0, 5.0]), 8)
    assert out[0] == 0.0 and torch.all((out - x).abs() <= scale / 2 + 1e-6)
    degenerate = fake_quantize_act(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.0, 0.0]), 8)
    assert torch.isfinite(degenerate).all() and degenerate[0] == 0.0 and degenerate.abs().max() < 1e-4


def test_ema_observer_first_batch_initializes_then_moves_slowly():
    first = observe_min_max(torch.tensor([-1.0, 3.0]), None)
    assert torch.equal(first, torch.tensor([-1.0, 3.0]))
    second = observe_min_max(torch.tensor([-11.0, 13.0]), first)
    expected = EMA_MOMENTUM * torch.tensor([-1.0, 3.0]) + (1 - EMA_MOMENTUM) * torch.tensor([-11.0, 13.0])
    torch.testing.assert_close(second, expected)
    assert EMA_MOMENTUM == 0.95
