"""Fuse a deployed attention's ``to_q`` / ``to_k`` / ``to_v`` (cross-attention: ``to_k`` / ``to_v``) into one layer.

The three projections of a self-attention read the same input, so unfused a deployed UNet quantizes that input
three times (same calibrated range, same codes) and launches three GEMMs (and, on the dequant path, three
unpacking kernels) of a third of the width. Fused, the input is quantized once and one GEMM produces all three
outputs: packed rows are independent along the output dimension, so concatenating them (with their scales, row
sums, bias and BOS K/V caches) computes exactly the same numbers. diffusers' ``FusedAttnProcessor2_0`` then
splits the result, as diffusers' own ``fuse_qkv_projections`` does for float layers.

Fused only where the layers agree on everything but their weights: weight and activation bits, path,
backend, activation quantizer and input width. In the MixDQ ~W4A8 SDXL config every attention qualifies (its
allocation gives a block's q / k / v the same bits). FP8 layers fuse too, and their product becomes cuBLAS
FP8's row-wise recipe: W4A8 / W2A8 ones (:class:`DeployedFP8CodesLinear`) have per-channel scales already, and
W8A8 ones (:class:`DeployedFP8Linear`), one weight scale per layer, get it repeated over that layer's rows.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mixdq.deploy.layers import DeployedFP8CodesLinear, DeployedFP8Linear, DeployedLinear
from mixdq.quant.api import unet_of

# per fusable type, what fused layers must share (everything but their weights, biases and BOS outputs)
# (act_qparams_t is made from act_kwargs, in_features and k_split: equal when they are)
SHARED = {
    DeployedLinear: (
        "weight_bits", "act_bits", "linear_path", "backend", "in_features", "k_split", "act_kwargs", "bos_inputs",
    ),
    DeployedFP8CodesLinear: (
        "weight_bits", "act_bits", "backend", "in_features", "k_split", "act_scale", "act_inv_scale", "fast_accum",
        "bos_inputs",
    ),
    DeployedFP8Linear: ("backend", "in_features", "act_scale", "act_inv_scale", "fast_accum", "bos_inputs"),
}  # fmt: skip


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _fusable(layers: list[Any]) -> bool:
    """True when ``layers`` are deployed linears of one fusable type that differ only in their weights (see the
    module docstring)."""
    first = layers[0]
    if type(first) not in SHARED or not all(type(layer) is type(first) for layer in layers):
        return False
    shared = SHARED[type(first)]
    return all(_equal(getattr(layer, key), getattr(first, key)) for layer in layers for key in shared) and (
        len({layer.bias is None for layer in layers}) == 1
    )


def fuse_linears(layers: list[nn.Module], name: str) -> nn.Module:
    """One deployed linear, of the ``layers``' type, whose output is the concatenation of their outputs (they
    must be fusable): packed rows, scales, row sums, bias and BOS outputs concatenated along the output
    dimension."""
    fused = copy.copy(layers[0])
    fused._buffers = dict(layers[0]._buffers)  # copy.copy shares the dict: the originals must not change
    fused._parameters, fused._modules = dict(layers[0]._parameters), dict(layers[0]._modules)
    fused.qweight = torch.cat([layer.qweight for layer in layers])
    # one scale per row (an FP8 W8A8 layer's per-tensor scale repeated over its rows)
    fused.weight_scale = torch.cat([layer.weight_scale.expand(layer.out_features) for layer in layers])
    if hasattr(layers[0], "out_scale"):  # FP8: weight scale x activation scale, row-wise cuBLAS's scale_b
        fused.out_scale = torch.cat([layer.out_scale.expand(layer.out_features) for layer in layers])
    if hasattr(layers[0], "weight_rowsum"):  # the integer A8 epilogue's zero-point correction
        fused.weight_rowsum = torch.cat([layer.weight_rowsum for layer in layers], dim=1)
    fused.bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    if layers[0].bos_outputs is not None:
        fused.bos_outputs = torch.cat([layer.bos_outputs for layer in layers], dim=-1)
    fused.out_features = sum(layer.out_features for layer in layers)
    fused.weight_shape = (fused.out_features, *layers[0].weight_shape[1:])
    fused.layer_name = name
    return fused


@torch.no_grad()
def fuse_qkv_projections(model: Any) -> int:
    """Fuse the projections of every attention of ``model``'s deployed UNet (a pipeline or the UNet) where
    they qualify (see the module docstring), in place; returns how many attentions were fused.

    A fused self-attention gets ``to_qkv`` and a cross-attention ``to_kv``; the layers they replace are
    removed (``None``), so the weights are not held twice, and the attention runs diffusers'
    ``FusedAttnProcessor2_0``. Call it after :func:`mixdq.deploy.deploy` and before ``torch.compile``.
    """
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    unet = unet_of(model)
    fused = 0
    for attn_name, attn in unet.named_modules():
        if not isinstance(attn, Attention) or getattr(attn, "fused_projections", False):
            continue
        names = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
        layers = [getattr(attn, name, None) for name in names]
        if not _fusable(layers):
            continue
        target = "to_kv" if attn.is_cross_attention else "to_qkv"
        setattr(attn, target, fuse_linears(layers, f"{attn_name}.{target}"))
        for name in names:
            setattr(attn, name, None)
        attn.fused_projections = True
        attn.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused
