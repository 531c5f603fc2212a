"""quantize_ / dequantize_ / quantization_off on the SDXL-architecture UNet."""

import copy

import pytest
import torch

from mixdq.config import ConfigError, PrecisionConfig
from mixdq.inventory import layer_inventory
from mixdq.quant import (
    CalibrationRequiredError,
    QuantLayer,
    collect_act_ranges,
    dequantize_,
    quant_layers,
    quantization_off,
    quantize_,
)


@pytest.fixture()
def unet(random_pipe):
    return copy.deepcopy(random_pipe.unet)


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([999.0]),
        "encoder_hidden_states": torch.randn(1, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.randn(1, 6, generator=g),
        },
    }


def run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def synthetic_ranges(layers, bits=(4, 8)):
    """Plausible ranges for every layer (API tests; real ones come from mixdq.calibrate)."""
    return {b: {i.name: torch.tensor([[-8.0, 8.0]] * (2 if i.concat_split else 1)) for i in layers} for b in bits}


def test_quantize_swaps_every_layer_and_keeps_inventory(unet):
    before = layer_inventory(unet)
    originals = {i.name: unet.get_submodule(i.name) for i in before}
    quantize_(unet, PrecisionConfig.uniform(before, 8, None))
    layers = quant_layers(unet)
    assert list(layers) == [i.name for i in before] and len(layers) == 264
    assert layer_inventory(unet) == before
    assert all(layers[n].fp_module is originals[n] for n in layers)
    assert all(layers[i.name].bos_aware == i.takes_text_embedding for i in before)
    assert all(layers[i.name].concat_split == i.concat_split for i in before)
    # idempotent: a second call re-applies bits on the same wrappers, never wraps a wrapper
    quantize_(unet, PrecisionConfig.uniform(before, 4, None))
    assert all(quant_layers(unet)[n] is layers[n] and layers[n].weight_bits == 4 for n in layers)
    assert not any(isinstance(m.fp_module, QuantLayer) for m in layers.values())


def test_quantization_off_and_dequantize_restore_exact_fp(unet):
    inputs = unet_inputs()
    fp = run(unet, inputs)
    layers = layer_inventory(unet)
    originals = {i.name: unet.get_submodule(i.name) for i in layers}
    quantize_(unet, PrecisionConfig.uniform(layers, 4, 8), act_ranges=synthetic_ranges(layers))
    quantized = run(unet, inputs)
    assert not torch.allclose(quantized, fp, atol=1e-3)
    with quantization_off(unet):
        assert torch.equal(run(unet, inputs), fp)
    assert torch.equal(run(unet, inputs), quantized), "modes come back after the block"
    quantize_(unet, None)
    assert torch.equal(run(unet, inputs), fp), "config None = every layer FP, bit-exact"
    dequantize_(unet)
    assert quant_layers(unet) == {}
    assert all(unet.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(run(unet, inputs), fp)


def test_single_layer_bits_for_sweeps(unet):
    inputs = unet_inputs()
    fp = run(unet, inputs)
    quantize_(unet, None, act_ranges=synthetic_ranges(layer_inventory(unet), bits=(8,)))
    layer = quant_layers(unet)["mid_block.resnets.0.conv1"]
    layer.set_bits(2, None)
    assert not torch.equal(run(unet, inputs), fp)
    layer.set_bits(None, 8)
    assert not torch.equal(run(unet, inputs), fp)
    with pytest.raises(CalibrationRequiredError, match="mid_block.resnets.0.conv1"):
        layer.set_bits(None, 4)
    layer.set_bits(None, None)
    assert torch.equal(run(unet, inputs), fp)


def test_protected_layers_stay_fp(unet):
    layers = layer_inventory(unet)
    name = layers[5].name
    config = PrecisionConfig.uniform(layers, 4, 8, protected=[name])
    quantize_(unet, config, act_ranges=synthetic_ranges(layers, bits=(8,)))
    layer = quant_layers(unet)[name]
    assert layer.weight_bits is None and layer.act_bits is None
    assert quant_layers(unet)[layers[6].name].weight_bits == 4


def test_bad_config_leaves_unet_untouched(unet):
    layers = layer_inventory(unet)
    bad_name = PrecisionConfig(weight_bits={layers[0].name: 8, "down_blocks.9.nope": 4})
    with pytest.raises(ConfigError, match="unknown layer 'down_blocks.9.nope'"):
        quantize_(unet, bad_name)
    assert quant_layers(unet) == {}
    with pytest.raises(ConfigError, match=r"has bits 3; allowed: \[2, 4, 8\]"):
        quantize_(unet, PrecisionConfig(weight_bits={layers[0].name: 8, layers[1].name: 3}))
    assert quant_layers(unet) == {}
    with pytest.raises(CalibrationRequiredError, match="run mixdq.calibrate"):
        quantize_(unet, PrecisionConfig.uniform(layers, 8, 8))
    assert quant_layers(unet) == {}
    # on an already-quantized UNet a rejected config changes no layer's bits
    quantize_(unet, PrecisionConfig.uniform(layers, 8, None))
    with pytest.raises(CalibrationRequiredError):
        quantize_(unet, PrecisionConfig.uniform(layers, 4, 4), act_ranges=synthetic_ranges(layers[:-1], bits=(4,)))
    assert all(q.weight_bits == 8 and q.act_bits is None for q in quant_layers(unet).values())
    assert all(q.act_range(4) is None for q in quant_layers(unet).values()), "ranges not half-loaded either"


def test_bad_act_ranges_rejected(unet):
    layers = layer_inventory(unet)
    split_layer = next(i.name for i in layers if i.concat_split)
    with pytest.raises(ConfigError, match=f"layer '{split_layer}' at 8 bits has shape \\(1, 2\\), expected \\(2, 2\\)"):
        quantize_(unet, None, act_ranges={8: {split_layer: torch.tensor([[-1.0, 1.0]])}})
    with pytest.raises(ConfigError, match="bits 6 not allowed"):
        quantize_(unet, None, act_ranges={6: {}})
    assert quant_layers(unet) == {}


def test_ranges_round_trip_through_layers(unet):
    layers = layer_inventory(unet)
    ranges = synthetic_ranges(layers)
    quantize_(unet, None, act_ranges=ranges)
    collected = collect_act_ranges(unet)
    assert collected.keys() == ranges.keys()
    assert all(torch.equal(collected[b][n], ranges[b][n]) for b in ranges for n in ranges[b])
