"""Layer inventory and exact weight-memory accounting."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mixdq.config import PrecisionConfig
from mixdq.inventory import (
    inventory_fingerprint,
    layer_block,
    layer_group,
    layer_inventory,
    non_layer_param_count,
    split_layer_name,
)
from mixdq.memory import average_weight_bits, layer_weight_bytes, weight_memory

SDXL_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "sdxl-turbo" / "unet_config.json"


def test_groups_match_exact_suffixes_only():
    assert layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "content"
    assert layer_group("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj") == "content"
    assert layer_group("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == "content"
    # attn1 and a name merely containing "ff" belong to the quality group
    assert layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k") == "quality"
    assert layer_group("diff_proj") == "quality"
    assert layer_block("up_blocks.2.resnets.0.conv1") == "up.2"
    assert layer_block("mid_block.resnets.0.conv1") == "mid"
    assert layer_block("time_embedding.linear_1") == "time_embedding"


@pytest.mark.parametrize(
    "name, unit, role",
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
            "down_blocks.1.attentions.0.transformer_blocks.1",
            "attn2.to_out.0",
        ),
        ("mid_block.resnets.1.conv_shortcut", "mid_block.resnets.1", "resnet.conv_shortcut"),
        ("up_blocks.0.attentions.2.proj_out", "up_blocks.0.attentions.2", "proj_out"),
        ("up_blocks.1.upsamplers.0.conv", "up_blocks.1.upsamplers.0", "upsample.conv"),
        ("down_blocks.0.downsamplers.0.conv", "down_blocks.0.downsamplers.0", "downsample.conv"),
        ("add_embedding.linear_2", "add_embedding.linear_2", "add_embedding.linear_2"),
    ],
)
def test_unit_and_role(name, unit, role):
    assert split_layer_name(name) == (unit, role)


def test_random_pipeline_inventory(random_pipe):
    layers = layer_inventory(random_pipe.unet)
    assert sum(i.kind == "linear" for i in layers) == 213
    assert sum(i.kind == "conv" for i in layers) == 51
    by_name = {i.name: i for i in layers}
    conv = by_name["conv_in"]
    assert (conv.out_features, conv.in_features) == (32, 4 * 3 * 3)
    to_k = by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert to_k.takes_text_embedding and to_k.group == "content" and to_k.in_features == 64
    # up-block conv_shortcut inputs are cat([hidden, skip]); the split is the hidden part's channels
    shortcut = by_name["up_blocks.1.resnets.1.conv_shortcut"]
    assert shortcut.concat_split == 64 and shortcut.in_features == 128
    assert by_name["down_blocks.1.resnets.0.conv_shortcut"].concat_split is None
    assert sum(i.concat_split is not None for i in layers) == 9


def test_concat_split_matches_the_real_concat(random_pipe, monkeypatch):
    """Record the two-tensor channel concats of a real forward pass; they are the up-block resnet
    inputs, in module order, and their first parts must equal the inventory's splits."""
    real_cat = torch.cat
    pairs = []

    def spy_cat(tensors, dim=0, **kw):
        if dim == 1 and len(tensors) == 2 and tensors[0].dim() == 4:
            pairs.append((tensors[0].shape[1], tensors[0].shape[1] + tensors[1].shape[1]))
        return real_cat(tensors, dim=dim, **kw)

    monkeypatch.setattr(torch, "cat", spy_cat)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        random_pipe.unet(
            torch.randn(1, 4, 16, 16), 999, encoder_hidden_states=torch.randn(1, 77, 64), added_cond_kwargs=added
        )
    monkeypatch.undo()
    expected = [
        (i.concat_split, i.in_features) for i in layer_inventory(random_pipe.unet) if i.concat_split is not None
    ]
    assert pairs == expected


def test_memory_matches_hand_computation():
    model = nn.Module()
    model.proj = nn.Linear(10, 3)  # K=10
    model.conv = nn.Conv2d(2, 4, 3, bias=False)  # K=18
    layers = layer_inventory(model)
    assert [i.name for i in layers] == ["proj", "conv"]
    proj, conv = layers
    # FP16: weights + bias, 2 bytes each
    assert layer_weight_bytes(proj, None) == (30 + 3) * 2
    # 4-bit: 3 rows of ceil(10*4/8)=5 bytes, + one fp16 scale per row, + fp16 bias
    assert layer_weight_bytes(proj, 4) == 3 * 5 + 3 * 2 + 3 * 2
    # 2-bit: ceil(10*2/8)=3 bytes per row (padded)
    assert layer_weight_bytes(proj, 2) == 3 * 3 + 3 * 2 + 3 * 2
    assert layer_weight_bytes(conv, 8) == 4 * 18 + 4 * 2
    config = PrecisionConfig(weight_bits={"proj": 4, "conv": 8})
    mem = weight_memory(layers, config, other_params=5)
    assert mem.total_bytes == (15 + 6 + 6) + (72 + 8) + 10
    assert mem.fp16_total_bytes == 66 + 144 + 10
    assert average_weight_bits(layers, config) == pytest.approx((30 * 4 + 72 * 8) / 102)
    protected = PrecisionConfig(weight_bits={"proj": 4, "conv": 8}, protected=["conv"])
    assert average_weight_bits(layers, protected) == pytest.approx((30 * 4 + 72 * 16) / 102)


def test_full_sdxl_unet_on_meta_device():
    from diffusers import UNet2DConditionModel

    config = json.loads(SDXL_CONFIG.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = layer_inventory(unet)
    assert len(layers) == 794
    assert sum(i.kind == "linear" for i in layers) == 743
    assert sum(i.kind == "conv" for i in layers) == 51
    assert sum(i.group == "content" for i in layers) == 420
    assert sum(i.concat_split is not None for i in layers) == 9
    mem = weight_memory(layers, None, non_layer_param_count(unet))
    assert mem.fp16_total_bytes == 2_567_463_684 * 2  # 5.13 GB
    assert round(mem.fp16_total_bytes / 1e9, 2) == 5.13
    w4 = weight_memory(layers, PrecisionConfig.uniform(layers, 4, None), non_layer_param_count(unet))
    assert 3.5 < mem.fp16_total_bytes / w4.total_bytes < 4.0


def test_fingerprint_changes_with_architecture(random_pipe):
    layers = layer_inventory(random_pipe.unet)
    other = nn.Module()
    other.proj = nn.Linear(10, 3)
    assert inventory_fingerprint(layers) == inventory_fingerprint(list(layers))
    assert inventory_fingerprint(layers) != inventory_fingerprint(layer_inventory(other))


def test_forward_order_key_matches_a_real_forward_pass():
    """Run the full SDXL UNet on the meta device and record the order its layers are called in."""
    from diffusers import UNet2DConditionModel

    from mixdq.inventory import forward_order_key

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(SDXL_CONFIG.read_text()))
    names = [i.name for i in layer_inventory(unet)]
    called = []
    for name in names:
        unet.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: called.append(name))
    with torch.device("meta"):
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        unet(torch.randn(1, 4, 8, 8), 999, encoder_hidden_states=torch.randn(1, 77, 2048), added_cond_kwargs=added)
    assert list(dict.fromkeys(called)) == sorted(names, key=forward_order_key)
