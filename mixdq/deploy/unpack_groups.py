"""Unpack all of a block's 4- and 2-bit weights with one kernel launch, not one launch per layer.

Two deployed linear layers unpack their packed weight on every call: W4A8 / W2A8 FP8 linears
(:class:`~mixdq.deploy.DeployedFP8CodesLinear`, codes to e4m3) and 4- / 2-bit linears on the dequant path
(:class:`~mixdq.deploy.DeployedLinear`, ``codes * scale`` to the input's dtype: deploy's default for them, and
every weight-only linear of W4A16). In the MixDQ ~W4A8 SDXL UNet that is ~450 small kernels per step, each too
small to fill the GPU, so they take about twice what their memory traffic needs
(``bench/results/gpu_unet_h200_2026-11-28.md``). Grouped, a forward pre-hook on each repeated block unpacks every
such layer of the block in one launch per kind (:meth:`kernels.PackedWeight.codes_fp8_group`,
:meth:`kernels.PackedWeight.dequantize_group`) and hands each layer its slice (``prefetched_weight``); the layers
use it instead of unpacking their own, so the numbers are unchanged (the same values, bit for bit). A forward hook
drops the slices when the block returns (also on an exception), so the unpacked weights live for one block's
forward: the static weight memory stays packed, the peak grows by one block's unpacked weights (~35 MB of e4m3 in
SDXL).

The layers are looked up when the block runs, so fusing (:func:`mixdq.deploy.fuse.fuse_qkv_projections`) before or
after grouping gives the same result. Works eagerly, in CUDA graphs and under ``torch.compile`` (whole UNet or
:func:`mixdq.deploy.compile.compile_repeated_blocks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import kernels
from kernels import fp8
from mixdq.deploy.layers import DeployedFP8CodesLinear, DeployedLinear
from mixdq.quant.api import unet_of

# the block whose linears are unpacked together: SDXL's transformer block holds 7 of them after q / k / v
# fusion (self-attention q/k/v and out, cross-attention q, k/v and out, the two feed-forward layers)
GROUP_BLOCKS = ("BasicTransformerBlock",)
MIN_GROUP = 2  # layers of one kind, at least: one launch then replaces several
_HOOKS = "_mixdq_unpack_group_hooks"


def fp8_groupable(module: nn.Module) -> bool:
    """A 4- / 2-bit FP8 linear with one K part that cuBLAS FP8 takes (the shapes it refuses never unpack to
    e4m3 on the GPU)."""
    return (
        isinstance(module, DeployedFP8CodesLinear)
        and module.k_split is None
        and fp8.fp8_shape_ok(module.in_features, module.out_features)
    )


def dequant_groupable(module: nn.Module) -> bool:
    """A 4- / 2-bit linear on the dequant path with one K part."""
    return (
        isinstance(module, DeployedLinear)
        and module.linear_path == "dequant"
        and module.weight_bits in (4, 2)
        and module.k_split is None
    )


def groupable(module: nn.Module) -> bool:
    """True for a layer whose per-call unpacking the grouped one can replace."""
    return fp8_groupable(module) or dequant_groupable(module)


def block_members(block: nn.Module) -> list[nn.Module]:
    """The block's groupable layers, in module order."""
    return [m for m in block.modules() if groupable(m)]


def _kinds(block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The block's groupable layers by kind: (FP8 codes, dequant path), each in module order."""
    members = block_members(block)
    return [m for m in members if fp8_groupable(m)], [m for m in members if dequant_groupable(m)]


def _groups_something(block: nn.Module) -> bool:
    """At least :data:`MIN_GROUP` layers of one kind."""
    return any(len(kind) >= MIN_GROUP for kind in _kinds(block))


def _input_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype of the block's hidden states: what the dequant path multiplies in."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.dtype if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() else None


def _hand_out(members: list[nn.Module], flat: torch.Tensor) -> None:
    start = 0
    for member in members:
        size = member.out_features * member.in_features
        member.prefetched_weight = flat[start : start + size].view(member.out_features, member.in_features)
        start += size


def _unpack_block(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: one launch per kind unpacks the members; each gets the ``[N, K]`` view of its slice."""
    codes, dequant = _kinds(block)
    if len(codes) >= MIN_GROUP:
        backend = kernels.resolve_backend(codes[0].qweight, codes[0].backend)
        _hand_out(codes, kernels.PackedWeight.codes_fp8_group([m.packed_weight for m in codes], backend))
    dtype = _input_dtype(args, kwargs)
    if len(dequant) >= MIN_GROUP and dtype is not None:
        backend = kernels.resolve_backend(dequant[0].qweight, dequant[0].backend)
        weights = [m.packed_weight for m in dequant]
        _hand_out(dequant, kernels.PackedWeight.dequantize_group(weights, dtype, backend))


def _release_block(block: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (also on an exception): the slices are dropped, so they live for one block's forward."""
    for member in block_members(block):
        member.prefetched_weight = None


def group_unpacking(model: Any, block_types: tuple[str, ...] = GROUP_BLOCKS) -> int:
    """Group the unpacking of each ``block_types`` block of ``model``'s UNet (a pipeline or the UNet) that holds
    at least two groupable layers, in place; returns how many blocks. Calling it again changes nothing.

    Raises ``ValueError`` when no block qualifies (no deployed 4- / 2-bit linears that unpack per call: the
    integer GEMM paths read their packed weight directly), so a call cannot silently do nothing."""
    unet = unet_of(model)
    blocks = [m for m in unet.modules() if type(m).__name__ in block_types and _groups_something(m)]
    if not blocks:
        raise ValueError(
            f"no {' / '.join(block_types)} holds two or more deployed 4- / 2-bit linears that unpack their weight "
            "per call (FP8 ones, or linear_path='dequant'): nothing to group."
        )
    for block in blocks:
        if not hasattr(block, _HOOKS):
            pre = block.register_forward_pre_hook(_unpack_block, with_kwargs=True)
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
