"""``quantize_``: swap every ``nn.Linear`` / ``nn.Conv2d`` of a UNet for a :class:`QuantLayer` and apply a
:class:`~mixdq.config.PrecisionConfig`, in place, torchao style.

The swap happens once; later calls only re-apply bits, so switching configs (or, through
:func:`quant_layers`, single layers) costs no model rebuild.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixdq.config import ACT_BITS, ConfigError, PrecisionConfig
from mixdq.inventory import LayerInfo, layer_inventory
from mixdq.quant.layers import CalibrationRequiredError, QuantLayer, QuantMode

if TYPE_CHECKING:
    from mixdq.quant.ranges import ActivationRanges

# {act bits: {layer name: float32 (parts, 2) range}}
RangeMap = Mapping[int, Mapping[str, torch.Tensor]]


def unet_of(model: Any) -> nn.Module:
    """Accept a pipeline (anything with ``.unet``) or the UNet itself; ``TypeError`` for anything else."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a diffusers pipeline or a UNet (nn.Module), got {type(model).__name__}.")
    return unet


def quant_layers(model: Any) -> dict[str, QuantLayer]:
    """``{layer name: QuantLayer}`` of a quantized UNet (or pipeline), in module order; empty if not quantized."""
    return {name: m for name, m in unet_of(model).named_modules() if isinstance(m, QuantLayer)}


def quantize_(
    model: Any,
    config: PrecisionConfig | None = None,
    act_ranges: ActivationRanges | RangeMap | None = None,
    bos_aware: bool = True,
):
    """Make ``model``'s UNet fake-quantized per ``config`` (``None``: every layer in FP) and return ``model``.

    ``act_ranges`` (from :func:`mixdq.calibrate.calibrate`) are loaded into the layers first; ranges loaded
    earlier stay. Everything is validated before the first module is touched, so a bad config or missing
    calibration raises with the UNet unchanged. Calling it again on a quantized UNet only re-applies bits.

    ``bos_aware=False`` is the naive baseline of MixDQ's ablation: cross-attention ``to_k`` / ``to_v`` quantize
    the BOS token with the rest of the text embedding. Every call sets the flag, so a naive run cannot leak
    into the next one; ranges calibrated under the other setting are rejected (their ``to_k`` / ``to_v``
    ranges include or exclude the BOS outlier).
    """
    unet = unet_of(model)
    layers = layer_inventory(unet)
    if config is not None:
        config.validate(layers)
    _check_bos_setting(act_ranges, bos_aware)
    ranges = _check_ranges(layers, act_ranges)
    existing = quant_layers(unet)
    for info in layers:
        bits = config.layer_act_bits(info.name) if config is not None else None
        if bits is None or info.name in ranges.get(bits, {}):
            continue
        if info.name not in existing or existing[info.name].act_range(bits) is None:
            raise CalibrationRequiredError(info.name, bits)

    for info in layers:
        layer = existing.get(info.name)
        if layer is None:
            layer = QuantLayer(unet.get_submodule(info.name), info.name, info.concat_split)
            unet.set_submodule(info.name, layer)
        layer.bos_aware = bos_aware and info.takes_text_embedding
        for bits, by_layer in ranges.items():
            if info.name in by_layer:
                layer.set_act_range(bits, by_layer[info.name])
        layer.fp8 = config is not None and config.layer_fp8(info.name)
        layer.weight_clip = "minmax" if config is None else config.weight_clip
        if config is None:
            layer.set_bits(None, None)
        else:
            layer.set_bits(config.layer_weight_bits(info.name), config.layer_act_bits(info.name))
        layer.mode = QuantMode.QUANTIZED
    return model


def _check_bos_setting(act_ranges: ActivationRanges | RangeMap | None, bos_aware: bool) -> None:
    """Ranges that say how they were calibrated must match ``bos_aware`` (plain maps carry no provenance)."""
    if act_ranges is None or isinstance(act_ranges, Mapping):
        return
    calibrated = act_ranges.provenance.get("quantizer", {}).get("bos_aware_text_embedding")
    if calibrated is not None and calibrated != bos_aware:
        raise ConfigError(
            f"act_ranges were calibrated with bos_aware={calibrated} but quantize_ was called with "
            f"bos_aware={bos_aware}; calibrate again with calibrate(pipe, ..., bos_aware={bos_aware})."
        )


def _check_ranges(
    layers: list[LayerInfo], act_ranges: ActivationRanges | RangeMap | None
) -> dict[int, dict[str, torch.Tensor]]:
    """Plain ``{bits: {name: range}}`` after checking bits, names and shapes against the inventory."""
    if act_ranges is None:
        return {}
    range_map = act_ranges if isinstance(act_ranges, Mapping) else act_ranges.ranges
    by_name = {info.name: info for info in layers}
    for bits, by_layer in range_map.items():
        if bits not in ACT_BITS:
            raise ConfigError(f"act_ranges: bits {bits!r} not allowed; activation bits are {list(ACT_BITS)}.")
        for name, act_range in by_layer.items():
            if name not in by_name:
                raise ConfigError(f"act_ranges: unknown layer {name!r} (not a Linear/Conv2d of this UNet).")
            parts = 1 if by_name[name].concat_split is None else 2
            if tuple(act_range.shape) != (parts, 2):
                raise ConfigError(
                    f"act_ranges: layer {name!r} at {bits} bits has shape {tuple(act_range.shape)}, expected ({parts}, 2)."
                )
    return {bits: dict(by_layer) for bits, by_layer in range_map.items()}


def collect_act_ranges(model: Any) -> dict[int, dict[str, torch.Tensor]]:
    """The activation ranges held by a quantized UNet, ``{bits: {name: (parts, 2) range}}`` on the CPU."""
    collected: dict[int, dict[str, torch.Tensor]] = {}
    for name, layer in quant_layers(model).items():
        for bits in ACT_BITS:
            act_range = layer.act_range(bits)
            if act_range is not None:
                collected.setdefault(bits, {})[name] = act_range.detach().cpu().clone()
    return collected


def set_mode(model: Any, mode: QuantMode) -> None:
    """Put every quantized layer in ``mode``."""
    for layer in quant_layers(model).values():
        layer.mode = QuantMode(mode)


@contextmanager
def quantization_off(model: Any) -> Iterator[None]:
    """Within the block the UNet computes its exact FP output; each layer's previous mode comes back after."""
    layers = quant_layers(model)
    modes = {name: layer.mode for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.mode = QuantMode.FP
        yield
    finally:
        for name, layer in layers.items():
            layer.mode = modes[name]


def dequantize_(model: Any):
    """Put the original ``nn.Linear`` / ``nn.Conv2d`` modules back (dropping scales and ranges); return ``model``."""
    unet = unet_of(model)
    for name, layer in quant_layers(unet).items():
        unet.set_submodule(name, layer.fp_module)
    return model
