"""deploy_layer's table (mixdq.deploy.LAYER_CLASSES): every (kind, precision, FP8) gets the module the if-chain it
replaced chose, with the paths deploy_layer was given."""

import pytest
import torch
from torch import nn

from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.deploy import (
    LAYER_CLASSES,
    DeployedConv2d,
    DeployedFP8CodesLinear,
    DeployedFP8Linear,
    DeployedLinear,
    deploy_layer,
    layer_class,
)
from mixdq.quant import QuantLayer
from tests.test_deploy import fake_quant_layer


def if_chain_choice(layer: QuantLayer) -> type[nn.Module] | str:
    """What deploy_layer returned before the table (mixdq/deploy.py at d050992), for a layer it accepts."""
    if layer.weight_bits is None:
        return "the fake-quant layer" if layer.act_bits is not None else "the float module"
    if isinstance(layer.fp_module, nn.Conv2d):
        return DeployedConv2d
    if layer.fp8:
        return DeployedFP8Linear if layer.weight_bits == 8 else DeployedFP8CodesLinear
    return DeployedLinear


def test_the_table_holds_one_class_per_deployable_kind_bits_and_fp8():
    keys = {(kind, bits, fp8) for kind in ("linear", "conv") for bits in WEIGHT_BITS for fp8 in (False, True)}
    assert set(LAYER_CLASSES) == keys - {("conv", bits, True) for bits in WEIGHT_BITS}  # FP8: linears only
    with pytest.raises(ValueError, match=r"\('conv', 8, True\)"):
        layer_class("conv", 8, True)


@torch.no_grad()
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("act_bits", [None, *ACT_BITS])
@pytest.mark.parametrize("weight_bits", [None, *WEIGHT_BITS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_each_combination_deploys_to_what_the_if_chain_chose(kind, weight_bits, act_bits, fp8):
    torch.manual_seed(0)
    if kind == "linear":
        module, x = nn.Linear(16, 8), torch.randn(2, 3, 16)
    else:
        module, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)
    layer = fake_quant_layer(module, weight_bits, act_bits, x)
    layer.fp8 = fp8
    paths = {"conv_path": "gemm", "linear_path": "dequant", "fp8_fast_accum": True}  # none of them a default
    if fp8 and weight_bits is not None and (kind == "conv" or act_bits != 8):
        with pytest.raises(ValueError, match="FP8 e4m3 deploys A8 linear layers only"):
            deploy_layer(layer, **paths)
        return
    expected = if_chain_choice(layer)
    deployed = deploy_layer(layer, **paths)
    if expected == "the fake-quant layer":
        assert deployed is layer
    elif expected == "the float module":
        assert deployed is module
    else:
        assert type(deployed) is expected is layer_class(kind, weight_bits, fp8)
        assert deployed.weight_bits == weight_bits and deployed.act_bits == act_bits
        if expected is DeployedConv2d:
            assert deployed.conv_path == "gemm"
        elif expected is DeployedLinear:
            assert deployed.linear_path == "dequant"
        else:
            assert deployed.fast_accum is True
