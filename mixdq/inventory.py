"""The UNet's quantizable layers: one source of truth for names, kinds, shapes and MixDQ groups.

Everything that needs a layer list (quantization, calibration, sensitivity, allocation, memory
accounting, config validation) takes it from :func:`layer_inventory`, which reads the model itself.
It works on a UNet built on the ``meta`` device, so the full SDXL inventory costs no memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

# MixDQ's content group: cross-attention projections and feed-forward layers, matched by exact
# module-name suffix (a substring such as "ff" would also match unrelated names).
CONTENT_SUFFIXES: tuple[str, ...] = (
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
# Inputs of these layers are the text embedding; its BOS token gets MixDQ's special treatment.
TEXT_EMBEDDING_SUFFIXES: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer (an ``nn.Linear`` or ``nn.Conv2d`` of the UNet)."""

    name: str
    kind: str  # "linear" | "conv"
    out_features: int
    in_features: int  # per output row: in_features for Linear, in_channels*kh*kw for Conv2d
    weight_shape: tuple[int, ...]
    has_bias: bool
    group: str  # "content" | "quality"
    block: str  # "down.0", "mid", "up.2", "time_embedding", "conv_in", ...
    concat_split: int | None = None  # channels of the first part when the input is a concat of two

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def takes_text_embedding(self) -> bool:
        return self.name.endswith(TEXT_EMBEDDING_SUFFIXES)

    @property
    def role(self) -> str:
        return layer_role(self.name)


def layer_group(name: str) -> str:
    """MixDQ's metric group of a layer: ``content`` (scored by SSIM) or ``quality`` (by SQNR)."""
    return "content" if name.endswith(CONTENT_SUFFIXES) else "quality"


def layer_block(name: str) -> str:
    """The UNet stage a layer belongs to, for grouping and heatmap rows."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0][:-7]}.{parts[1]}"
    if parts[0] == "mid_block":
        return "mid"
    return parts[0]


_UNIT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*transformer_blocks\.\d+)\.(.+)$"), "{0}"),
    (re.compile(r"^(.*resnets\.\d+)\.(.+)$"), "resnet.{0}"),
    (re.compile(r"^(.*attentions\.\d+)\.(proj_in|proj_out)$"), "{0}"),
    (re.compile(r"^(.*(?:down|up)samplers\.\d+)\.(conv)$"), "{0}"),
)


def split_layer_name(name: str) -> tuple[str, str]:
    """``(unit, role)``: the module a layer belongs to (a transformer block, a resnet, ...) and what
    the layer does there (``attn2.to_k``, ``resnet.conv1``, ``downsample.conv``, ``proj_in``).
    Top-level layers (``conv_in``, ``time_embedding.linear_1``) are their own unit and role."""
    for pattern, template in _UNIT_PATTERNS:
        match = pattern.match(name)
        if match:
            unit, tail = match.groups()
            if tail == "conv":
                return unit, ("downsample" if ".downsamplers." in name else "upsample") + ".conv"
            return unit, template.format(tail)
    return name, name


def layer_role(name: str) -> str:
    """What a layer does, independent of where it sits (rows of the studio's heatmaps)."""
    return split_layer_name(name)[1]


_STAGE_RANK = {"time_embedding": 0, "add_embedding": 1, "conv_in": 2, "down": 3, "mid": 4, "up": 5, "conv_out": 6}
_INNER = re.compile(r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)")


def forward_order_key(name: str) -> tuple:
    """Sort key placing layers in the order the UNet runs them: stem, down blocks, mid, up blocks,
    conv_out; inside a block resnet i, then attention i, then the sampler. (``named_modules`` order
    differs: diffusers registers ``mid_block`` after ``up_blocks`` and attentions before resnets.)"""
    block = layer_block(name)
    stage, _, index = block.partition(".")
    inner = _INNER.search(name)
    if inner is None:
        position: tuple[int, int] = (0, 0)
    elif inner.group(1).endswith("samplers"):
        position = (1_000_000, 0)
    else:
        position = (int(inner.group(2)), 0 if inner.group(1) == "resnets" else 1)
    return (_STAGE_RANK.get(stage, len(_STAGE_RANK)), int(index or 0), position)


def up_block_concat_splits(unet: nn.Module) -> dict[str, int]:
    """Channels of ``hidden_states`` inside the ``cat([hidden_states, skip])`` fed to up-block resnets.

    Up-block resnets receive the concat of the upsampled features and the skip connection, two
    tensors with very different ranges; their ``conv_shortcut`` input is quantized as two parts.
    The split is read from the module structure: the first part carries the channels produced by
    the previous resnet (or, for the first resnet of a block, by the previous block / mid block).
    """
    splits: dict[str, int] = {}
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return splits
    mid = getattr(unet, "mid_block", None)
    previous_out = mid.resnets[-1].out_channels if mid is not None else None
    for b, block in enumerate(up_blocks):
        for r, resnet in enumerate(block.resnets):
            first_part = previous_out if r == 0 else block.resnets[r - 1].out_channels
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is not None and first_part is not None and first_part < resnet.in_channels:
                splits[f"up_blocks.{b}.resnets.{r}.conv_shortcut"] = int(first_part)
        previous_out = block.resnets[-1].out_channels
    return splits


def layer_inventory(unet: nn.Module) -> list[LayerInfo]:
    """All ``nn.Linear`` / ``nn.Conv2d`` layers of ``unet`` in module order.

    Already-quantized layers (see :mod:`mixdq.quant`) report the shape of the layer they wrap, and
    deployed packed layers (:mod:`mixdq.deploy`) the shape of the layer they replaced, so the inventory
    is the same before and after ``quantize_`` and ``deploy``.
    """
    splits = up_block_concat_splits(unet)
    layers: list[LayerInfo] = []
    for name, module in unet.named_modules():
        wrapped = getattr(module, "fp_module", None)
        if wrapped is not None:
            module = wrapped
        elif ".fp_module" in name:
            continue
        if isinstance(module, nn.Linear):
            kind, rows, cols, shape = "linear", module.out_features, module.in_features, tuple(module.weight.shape)
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            kind, shape = "conv", tuple(module.weight.shape)
            rows, cols = module.out_channels, module.in_channels // module.groups * kh * kw
        elif hasattr(module, "weight_shape") and hasattr(module, "kind"):  # a deployed packed layer
            kind, rows, cols, shape = module.kind, module.out_features, module.in_features, module.weight_shape
        else:
            continue
        layers.append(
            LayerInfo(
                name=name,
                kind=kind,
                out_features=rows,
                in_features=cols,
                weight_shape=shape,
                has_bias=getattr(module, "bias", None) is not None,
                group=layer_group(name),
                block=layer_block(name),
                concat_split=splits.get(name),
            )
        )
    return layers


def non_layer_param_count(unet: nn.Module) -> int:
    """Parameters outside the quantizable layers (norms, embeddings): they always stay in FP16."""
    total = sum(p.numel() for p in unet.parameters())
    layer_params = sum(p.numel() for i in layer_inventory(unet) for p in unet.get_submodule(i.name).parameters())
    return total - layer_params


def inventory_fingerprint(layers: list[LayerInfo]) -> str:
    """A short hash of layer names and shapes: tells whether a config belongs to this architecture."""
    digest = hashlib.sha256()
    for info in layers:
        digest.update(f"{info.name}:{'x'.join(map(str, info.weight_shape))};".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class UNetInventory:
    """A UNet's quantizable layers plus its parameter count outside them: what memory accounting needs."""

    layers: tuple[LayerInfo, ...]
    other_params: int


def inventory_from_unet_config(path: str | Path) -> UNetInventory:
    """The exact inventory of the UNet a diffusers ``config.json`` describes, built on ``meta`` (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(Path(path).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return UNetInventory(tuple(layer_inventory(unet)), non_layer_param_count(unet))
