"""MSE-clipped weight scales (``PrecisionConfig.weight_clip = "mse"``) against MixDQ's min-max scales."""

import pytest
import torch
from torch import nn

from mixdq.config import ConfigError, PrecisionConfig
from mixdq.deploy import deploy_layer
from mixdq.inventory import layer_inventory
from mixdq.quant import QuantLayer, quant_layers, quantize_
from mixdq.quant.primitives import fake_quantize_weight, weight_qmax, weight_scales, weight_scales_mse
from tests.test_deploy import assert_within_fp16_rounding, fake_quant_layer


def row_errors(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (fake_quantize_weight(w, scale, bits) - w).square().sum(1)


def sqnr_db(w: torch.Tensor, scale: torch.Tensor, bits: int) -> float:
    return float(10 * torch.log10(w.square().sum() / row_errors(w, scale, bits).sum()))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_scales_are_never_worse_than_minmax_per_row(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[3, 7] = 40.0  # one outlier row
    minmax, mse = weight_scales(w)[bits], weight_scales_mse(w, bits)
    assert mse.shape == minmax.shape and mse.dtype == torch.float32
    assert (row_errors(w, mse, bits) <= row_errors(w, minmax, bits)).all()
    assert (mse <= minmax).all()  # clipping only ever shrinks the range
    codes = torch.round(w / mse[:, None]).clamp(-weight_qmax(bits), weight_qmax(bits))
    assert codes.abs().max() <= weight_qmax(bits)


def test_mse_clipping_rescues_ternary_weights():
    """Min-max ternary keeps only weights above half the row's max (~5% of a Gaussian row) non-zero."""
    torch.manual_seed(1)
    w = torch.randn(128, 1024)
    gains = {
        bits: sqnr_db(w, weight_scales_mse(w, bits), bits) - sqnr_db(w, weight_scales(w)[bits], bits)
        for bits in (2, 4, 8)
    }
    print({b: f"{g:+.2f} dB" for b, g in gains.items()})
    assert gains[2] > 4.0  # measured +6.0 dB on these Gaussian rows (embedded UNet: 3.8 -> 9.0 dB)
    assert 0.5 < gains[4] < 3.0
    assert abs(gains[8]) < 0.3
    minmax_nonzero = (fake_quantize_weight(w, weight_scales(w)[2], 2) != 0).float().mean()
    mse_nonzero = (fake_quantize_weight(w, weight_scales_mse(w, 2), 2) != 0).float().mean()
    assert minmax_nonzero < 0.1 and mse_nonzero > 0.3


@torch.no_grad()
def test_layer_and_deploy_use_the_configured_scales():
    torch.manual_seed(2)
    x = torch.randn(3, 8, 96)
    layer = fake_quant_layer(nn.Linear(96, 48), 2, 8, x)
    minmax_out = layer(x).clone()
    layer.weight_clip = "mse"
    mse_out = layer(x)
    assert not torch.equal(minmax_out, mse_out)
    torch.testing.assert_close(layer.weight_scale(2), weight_scales_mse(layer.fp_module.weight, 2))
    fp = layer.fp_module(x)
    assert (mse_out - fp).norm() < (minmax_out - fp).norm()
    deployed = deploy_layer(layer)
    torch.testing.assert_close(deployed.weight_scale, layer.weight_scale(2))
    assert_within_fp16_rounding(deployed(x), mse_out)
    with pytest.raises(ValueError, match="weight_clip"):
        QuantLayer(nn.Linear(4, 4), "x").weight_clip = "percentile"


def test_config_carries_weight_clip_into_the_layers(fresh_random_pipe):
    layers = layer_inventory(fresh_random_pipe.unet)
    config = PrecisionConfig.uniform(layers, 4, None)
    config.weight_clip = "mse"
    assert PrecisionConfig.from_json(config.to_json()).weight_clip == "mse"
    old_json = {key: value for key, value in config.to_dict().items() if key != "weight_clip"}
    assert PrecisionConfig.from_dict(old_json).weight_clip == "minmax"  # configs written before the field
    quantize_(fresh_random_pipe, config)
    assert {q.weight_clip for q in quant_layers(fresh_random_pipe).values()} == {"mse"}
    quantize_(fresh_random_pipe, PrecisionConfig.uniform(layers, 4, None))
    assert {q.weight_clip for q in quant_layers(fresh_random_pipe).values()} == {"minmax"}
    with pytest.raises(ConfigError, match="yaml"):
        config.to_mixdq_yaml(layers)
    config.weight_clip = "p99"
    with pytest.raises(ConfigError, match="weight_clip"):
        config.validate(layers)
