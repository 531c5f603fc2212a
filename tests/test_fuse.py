"""mixdq.deploy.fuse: deployed q / k / v (cross-attention: k / v) fused into one layer compute the same images."""

import copy

import torch

from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.deploy import DeployedFP8CodesLinear, DeployedFP8Linear, DeployedLinear, deploy
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.inventory import layer_inventory
from tests.test_deploy import CALIBRATION_PROMPTS, generate


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


@torch.no_grad()
def test_fused_projections_make_the_same_images_and_hold_the_same_bytes(random_pipe):
    pipe, ranges = calibrated_copy(random_pipe)
    deploy(pipe, attention_config(pipe.unet, ranges), ranges)
    unfused = generate(pipe)
    nbytes = sum(t.numel() * t.element_size() for t in [*pipe.unet.parameters(), *pipe.unet.buffers()])
    attentions = [m for m in pipe.unet.modules() if type(m).__name__ == "Attention"]
    projections = {id(m): [m.to_k, m.to_v] if m.is_cross_attention else [m.to_q, m.to_k, m.to_v] for m in attentions}

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
    # moved into the fused layers, not copied; the copies of the shared input's quantizer and BOS keys are gone
    shared = sum(
        t.numel() * t.element_size()
        for m in attentions
        if getattr(m, "to_qkv", None) is not None or getattr(m, "to_kv", None) is not None
        for layer in projections[id(m)][1:]
        for t in (
            getattr(layer, "act_qparams_t", None),
            layer.bos_inputs,
            getattr(layer, "act_scale", None),
            getattr(layer, "act_inv_scale", None),
        )
        if t is not None
    )
    held = sum(t.numel() * t.element_size() for t in [*pipe.unet.parameters(), *pipe.unet.buffers()])
    # the fused FP8 layer holds its two per-tensor weight scales (and out_scale, weight x activation scale, the
    # row-wise recipe's scale_b) as one float32 per row
    assert fp8_kv[0].out_scale.shape == fp8_kv[0].weight_scale.shape
    torch.testing.assert_close(fp8_kv[0].out_scale, fp8_kv[0].weight_scale * fp8_kv[0].act_scale, rtol=0, atol=0)
    grown = 2 * (fp8_kv[0].weight_scale.numel() * 4 - 2 * 4)
    assert shared > 0 and held == nbytes - shared + grown
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
