"""Exact bytes of the UNet's weights under a precision config.

Layout assumed: a quantized layer stores its integer codes packed along the input dimension, each output
row padded to whole bytes (``ceil(in * bits / 8)``, per input part), plus one FP16 scale per output channel
and input part and an FP16 bias. A split up-block ``conv_shortcut`` (``cat([hidden, skip])`` input) has two
input parts, each with its own weight scales (MixDQ's two weight quantizers); every other layer has one. So
bytes are linear in bits and a MB budget has an exact average-bits equivalent. :mod:`mixdq.deploy` pads
4- and 2-bit rows further, to whole 128-code chunks per input part (:func:`kernels.pack.packed_row_bytes`,
what the kernels read); its report gives those exact bytes: +0.02% over this model on the SDXL UNet at
4 bits, +8.8% on the embedded model's small layers. FP16 layers store weight and bias in FP16.
Parameters outside the quantizable layers (norms, positional tables) stay FP16.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixdq.config import PrecisionConfig
from mixdq.inventory import LayerInfo

FP16_BYTES = 2
FP16_BITS = 16
MB = 1e6


def input_parts(info: LayerInfo) -> tuple[int, ...]:
    """Input features per output row of each separately quantized input part: ``(in_features,)``, or two
    entries for a concat-split input (``concat_split`` counts channels; a conv's row has kh*kw per channel)."""
    if info.concat_split is None:
        return (info.in_features,)
    per_channel = info.in_features // info.weight_shape[1]
    first = info.concat_split * per_channel
    return (first, info.in_features - first)


def layer_weight_bytes(info: LayerInfo, bits: int | None) -> int:
    """Bytes of one layer's weight, scales and bias at ``bits`` (``None`` = FP16)."""
    bias = info.out_features * FP16_BYTES if info.has_bias else 0
    if bits is None:
        return info.weight_numel * FP16_BYTES + bias
    parts = input_parts(info)
    packed_row = sum(-(-features * bits // 8) for features in parts)
    return info.out_features * (packed_row + len(parts) * FP16_BYTES) + bias


@dataclass(frozen=True)
class WeightMemory:
    """Weight memory of a UNet under a config, and the FP16 reference."""

    layer_bytes: int  # quantizable layers under the config
    layer_fp16_bytes: int  # the same layers in FP16
    other_fp16_bytes: int  # everything else (norms, ...), always FP16

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.other_fp16_bytes

    @property
    def fp16_total_bytes(self) -> int:
        return self.layer_fp16_bytes + self.other_fp16_bytes

    @property
    def ratio(self) -> float:
        """How many times smaller than FP16 the whole UNet's weights are."""
        return self.fp16_total_bytes / self.total_bytes


def weight_memory(layers: list[LayerInfo], config: PrecisionConfig | None, other_params: int = 0) -> WeightMemory:
    """Weight memory under ``config`` (``None`` = all FP16); ``other_params`` from
    :func:`mixdq.inventory.non_layer_param_count`."""
    layer_bytes = sum(layer_weight_bytes(i, config.layer_weight_bits(i.name) if config else None) for i in layers)
    fp16 = sum(layer_weight_bytes(i, None) for i in layers)
    return WeightMemory(layer_bytes, fp16, other_params * FP16_BYTES)


def average_weight_bits(layers: list[LayerInfo], config: PrecisionConfig) -> float:
    """Size-weighted average weight bits over the quantizable layers (FP16 layers count as 16),
    the quantity MixDQ's budget constrains."""
    total = sum(i.weight_numel for i in layers)
    bits = sum(i.weight_numel * (config.layer_weight_bits(i.name) or FP16_BITS) for i in layers)
    return bits / total
