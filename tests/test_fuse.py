"""mixdq.deploy.fuse: deployed q / k / v (cross-attention: k / v) fused into one layer compute the same images."""

import copy
import re

import torch

from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.deploy import DeployedFP8CodesLinear, DeployedFP8Linear, DeployedLinear, deploy
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.inventory import layer_inventory
from tests.test_deploy import (
    CALIBRATION_PROMPTS,
    expected_layer_bytes,
    generate,
    is_cross_attention_kv,
    other_param_bytes,
    packed_bytes_by_hand,
)


def calibrated_copy(random_pipe):
    """A pipeline sharing ``random_pipe``'s components but with its own UNet, and its A8 activation ranges."""
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    ranges = calibrate(
        pipe, CALIBRATION_PROMPTS, num_inference_steps=1, height=64, width=64, act_bits=(8,), progress=False
    )
    return pipe, ranges


def attention_config(unet, ranges) -> PrecisionConfig:
    """W8A8 (integer GEMM path) except 4-bit self-attention projections (dequant path), one self-attention
    with unequal bits (must stay unfused), and the cross-attention K/V of one transformer in FP8."""
    layers = layer_inventory(unet)
    config = PrecisionConfig.uniform(layers, 8, 8)
    attn1 = [i.name for i in layers if ".attn1.to_" in i.name and not i.name.endswith("to_out.0")]
    for name in attn1:
        config.weight_bits[name] = 4
    config.weight_bits[attn1[0]] = 2  # the first self-attention: q at 2 bits, k / v at 4
    fp8_kv = [i.name for i in layers if ".attn2.to_k" in i.name or ".attn2.to_v" in i.name][:2]
    config.fp8 = fp8_kv
    return config


def fp8_bytes_by_hand(shape: tuple[int, ...], has_bias: bool, bos_vectors: int, row_scales: bool) -> int:
    """A deployed W8A8 FP8 linear (float32 model): one e4m3 byte per weight, float32 activation scale and its
    inverse, float32 weight scale and out scale (weight x activation) per tensor or, fused, per row; the bias;
    the BOS K/V cache (``bos_vectors`` inputs of width K and outputs of width N)."""
    n, k = shape
    scales = 2 * 4 + 2 * 4 * (n if row_scales else 1)
    return n * k + scales + (4 * n if has_bias else 0) + bos_vectors * (k + n) * 4


def held_bytes(unet) -> int:
    return sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])


@torch.no_grad()
def test_fused_projections_make_the_same_images_and_hold_the_same_bytes(random_pipe):
    pipe, ranges = calibrated_copy(random_pipe)
    inventory = layer_inventory(random_pipe.unet)  # the FP UNet this pipeline's is a copy of
    config = attention_config(pipe.unet, ranges)
    other = other_param_bytes(random_pipe.unet)
    deploy(pipe, config, ranges)
    unfused = generate(pipe)
    # by hand from the layer shapes: before fusing, every layer as deployed (FP8 K/V: per-tensor scales) ...
    by_name = {info.name: info for info in inventory}
    layer_bytes = {
        info.name: fp8_bytes_by_hand(info.weight_shape, info.has_bias, 2, row_scales=False)
        if info.name in config.fp8
        else expected_layer_bytes(info, config, 4)
        for info in inventory
    }
    assert held_bytes(pipe.unet) == other + sum(layer_bytes.values())
    # ... after: each fused attention's projections one layer of their stacked rows (one input quantizer, one
    # set of BOS inputs, FP8 scales per row); the first self-attention (2 / 4 / 4 bits) is left as it is
    prefixes = {name.rsplit(".to_", 1)[0] for name in by_name if re.search(r"\.attn[12]\.to_[qkv]$", name)}
    first_self = next(name for name in by_name if name.endswith(".attn1.to_q")).rsplit(".to_", 1)[0]
    fused_bytes = dict(layer_bytes)
    for prefix in prefixes - {first_self}:
        names = [f"{prefix}.to_{p}" for p in ("k", "v")] if prefix.endswith("attn2") else []
        names = names or [f"{prefix}.to_{p}" for p in ("q", "k", "v")]
        infos = [by_name[name] for name in names]
        first = infos[0]
        shape = (sum(i.out_features for i in infos), first.in_features)
        bos = 2 if is_cross_attention_kv(first.name) else 0
        if first.name in config.fp8:
            stacked = fp8_bytes_by_hand(shape, first.has_bias, bos, row_scales=True)
        else:
            bits, act_bits = config.weight_bits[first.name], config.act_bits.get(first.name)
            stacked = packed_bytes_by_hand(shape, bits, act_bits, first.has_bias, bos_vectors=bos)
        for name in names:
            del fused_bytes[name]
        fused_bytes[prefix] = stacked
    attentions = [m for m in pipe.unet.modules() if type(m).__name__ == "Attention"]

    fused = fuse_qkv_projections(pipe)

    assert fused == len(attentions) - 1  # the 2/4/4-bit self-attention stays
    qkv = [m.to_qkv for m in attentions if getattr(m, "to_qkv", None) is not None]
    kv = [m.to_kv for m in attentions if getattr(m, "to_kv", None) is not None]
    fp8_kv = [layer for layer in kv if isinstance(layer, DeployedFP8Linear)]
    assert len(fp8_kv) == 1 and fp8_kv[0].weight_scale.shape == (fp8_kv[0].out_features,)  # row-wise now
    kv = [layer for layer in kv if layer not in fp8_kv]
    assert qkv and kv and all(isinstance(layer, DeployedLinear) for layer in qkv + kv)
    assert {layer.linear_path for layer in qkv} == {"dequant"} and {layer.linear_path for layer in kv} == {"gemm"}
    assert all(layer.bos_outputs is not None for layer in kv)  # cross-attention K/V keep their BOS cache
    assert all(m.to_q is None and m.to_k is None and m.to_v is None for m in attentions if hasattr(m, "to_qkv"))
    # moved into the fused layers, not copied: exactly the stacked layers' bytes by hand
    assert fp8_kv[0].out_scale.shape == fp8_kv[0].weight_scale.shape
    torch.testing.assert_close(fp8_kv[0].out_scale, fp8_kv[0].weight_scale * fp8_kv[0].act_scale, rtol=0, atol=0)
    assert held_bytes(pipe.unet) == other + sum(fused_bytes.values())
    assert sum(fused_bytes.values()) < sum(layer_bytes.values())  # the shared quantizers and BOS keys are gone
    images = generate(pipe)
    torch.testing.assert_close(images, unfused, rtol=0, atol=1e-5)
    assert fuse_qkv_projections(pipe) == 0  # already fused

    # a fused self-attention traces in one graph (torch.compile, the deployed layers' compiled path)
    attn = next(m for m in attentions if getattr(m, "to_qkv", None) is not None)
    x = torch.randn(1, 16, attn.to_qkv.in_features)
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, attn(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_low_bit_fp8_projections_fuse_with_the_same_images(random_pipe):
    """W4A8 FP8 layers (per-channel integer weights, e4m3 activations) fuse like integer ones, and W8A8 FP8
    ones (one weight scale per layer) with their scales repeated row-wise: the same images."""
    pipe, ranges = calibrated_copy(random_pipe)
    layers = layer_inventory(pipe.unet)
    config = PrecisionConfig.uniform(layers, 4, 8)
    cross_kv = [i.name for i in layers if ".attn2.to_k" in i.name or ".attn2.to_v" in i.name]
    for name in cross_kv:
        config.weight_bits[name] = 8  # the cross-attentions at W8A8 FP8
    deploy(pipe, config.with_fp8_linears(layers, low_bit=True), ranges)
    unfused = generate(pipe)
    attentions = [m for m in pipe.unet.modules() if type(m).__name__ == "Attention"]

    fused = fuse_qkv_projections(pipe)

    assert fused == len(attentions) > 0
    qkv = [m.to_qkv for m in attentions if not m.is_cross_attention]
    assert all(isinstance(layer, DeployedFP8CodesLinear) and layer.precision == "W4A8 FP8" for layer in qkv)
    kv = [m.to_kv for m in attentions if m.is_cross_attention]
    assert all(isinstance(layer, DeployedFP8Linear) and layer.weight_scale.dim() == 1 for layer in kv)
    torch.testing.assert_close(generate(pipe), unfused, rtol=0, atol=1e-5)
