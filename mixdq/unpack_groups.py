"""Unpack all of a block's 4- and 2-bit FP8 linear weights with one kernel launch, not one launch per layer.

A deployed W4A8 / W2A8 FP8 linear (:class:`~mixdq.deploy.DeployedFP8CodesLinear`) unpacks its packed codes to
e4m3 on every call. In the MixDQ ~W4A8 SDXL UNet that is ~500 small kernels per step, 1.84 ms of GPU time on
an H200 where their memory traffic alone would take well under half of that: each launch is too small to
fill the GPU (``bench/results/gpu_unet_h200_2026-11-28.md``, session 6 profile). Grouped, a forward pre-hook on
each repeated block unpacks every such layer of the block in one launch
(:meth:`kernels.PackedWeight.codes_fp8_group`) and hands each layer its slice; the layers use it instead of
unpacking their own, so the numbers are unchanged (the same codes, bit for bit). A forward hook drops the slices
when the block returns (also on an exception), so the unpacked weights live for one block's forward: the
static weight memory stays packed, the peak grows by one block's unpacked codes (~35 MB in SDXL).

The layers are looked up when the block runs, so fusing (:func:`mixdq.fuse.fuse_qkv_projections`) before or
after grouping gives the same result. Works eagerly, in CUDA graphs and under ``torch.compile`` (whole UNet or
:func:`mixdq.compile.compile_repeated_blocks`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

import kernels
from kernels import fp8
from mixdq.deploy import DeployedFP8CodesLinear
from mixdq.quant.api import unet_of

# the block whose FP8 linears are unpacked together: SDXL's transformer block holds 7 of them after q / k / v
# fusion (self-attention q/k/v and out, cross-attention q, k/v and out, the two feed-forward layers)
GROUP_BLOCKS = ("BasicTransformerBlock",)
_HOOKS = "_mixdq_unpack_group_hooks"


def groupable(module: nn.Module) -> bool:
    """True for a layer whose per-call unpacking the grouped one can replace: a 4- / 2-bit FP8 linear with one
    K part that cuBLAS FP8 takes (the shapes it refuses never unpack to e4m3 on the GPU)."""
    return (
        isinstance(module, DeployedFP8CodesLinear)
        and module.k_split is None
        and fp8.fp8_shape_ok(module.in_features, module.out_features)
    )


def block_members(block: nn.Module) -> list[DeployedFP8CodesLinear]:
    """The block's groupable layers, in module order."""
    return [m for m in block.modules() if groupable(m)]


def _unpack_block(block: nn.Module, args: Any) -> None:
    """Forward pre-hook: one launch unpacks every member; each gets the ``[N, K]`` view of its slice."""
    members = block_members(block)
    if len(members) < 2:
        return
    backend = kernels.resolve_backend(members[0].qweight, members[0].backend)
    flat = kernels.PackedWeight.codes_fp8_group([m.packed_weight for m in members], backend)
    start = 0
    for member in members:
        size = member.out_features * member.in_features
        member.prefetched_codes = flat[start : start + size].view(member.out_features, member.in_features)
        start += size


def _release_block(block: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (also on an exception): the slices are dropped, so they live for one block's forward."""
    for member in block_members(block):
        member.prefetched_codes = None


def group_unpacking(model: Any, block_types: tuple[str, ...] = GROUP_BLOCKS) -> int:
    """Group the unpacking of each ``block_types`` block of ``model``'s UNet (a pipeline or the UNet) that holds
    at least two groupable layers, in place; returns how many blocks. Calling it again changes nothing.

    Raises ``ValueError`` when no block qualifies (no deployed 4- / 2-bit FP8 linears: see
    ``PrecisionConfig.with_fp8_linears(low_bit=True)``), so a call cannot silently do nothing."""
    unet = unet_of(model)
    blocks = [m for m in unet.modules() if type(m).__name__ in block_types and len(block_members(m)) >= 2]
    if not blocks:
        raise ValueError(
            f"no {' / '.join(block_types)} holds two or more deployed 4- / 2-bit FP8 linears: nothing to group "
            "(deploy a config whose fp8 list names them, e.g. config.with_fp8_linears(layers, low_bit=True))."
        )
    for block in blocks:
        if not hasattr(block, _HOOKS):
            pre = block.register_forward_pre_hook(_unpack_block)
            post = block.register_forward_hook(_release_block, always_call=True)
            setattr(block, _HOOKS, (pre, post))
    return len(blocks)


def ungroup_unpacking(model: Any) -> int:
    """Remove what :func:`group_unpacking` installed; returns how many blocks had it."""
    count = 0
    for block in unet_of(model).modules():
        hooks = block.__dict__.pop(_HOOKS, None)
        if hooks is not None:
            for handle in hooks:
                handle.remove()
            _release_block(block, (), None)
            count += 1
    return count


def grouped_blocks(model: Any) -> int:
    """How many blocks of ``model``'s UNet unpack their layers grouped."""
    return sum(hasattr(block, _HOOKS) for block in unet_of(model).modules())
