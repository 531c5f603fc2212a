"""The Triton GEMMs as ``torch.library`` custom ops, so ``torch.compile`` can compile a deployed UNet.

Dynamo cannot trace into our launchers (autotune with config pruning, Python-float launch arguments), and a
graph break per layer would leave the attention / norm / elementwise work -- ~42% of a compiled SDXL step --
uncompiled. As custom ops each GEMM is one opaque node with a shape-only fake implementation: Inductor fuses
everything around it (the activation quantization too, into the op that produces the GEMM's input),
and the compiled graph still calls the same kernels, so numerics do not change.

Tensors travel as the op's arguments and everything else as ints / floats / lists (``k_split = -1``: none).
A weight's scale is ``[N]``, or ``[2, N]`` with a ``k_split`` (one row per K part): N is its last dimension.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.pack import PackedWeight


def _weight(qweight: torch.Tensor, scale: torch.Tensor, rowsum: torch.Tensor, bits: int, k: int, split: int):
    return PackedWeight(qweight, scale, rowsum, bits, k, None if split < 0 else split)


def _act(values: list):
    return values[0] if len(values) == 1 else tuple(values)


@torch.library.custom_op("mixdq::gemm_a8", mutates_args=())
def gemm_a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_rowsum: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library's schema inference reads Optional)
    weight_bits: int,
    in_features: int,
    k_split: int,
    act_scale: list[float],
    act_zp: list[int],
    act_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W{8,4,2}A8 Triton GEMM, ``x [M, K]`` (int8 codes or float) -> ``[M, N]`` in ``out_dtype``."""
    from kernels.gemm_wxa8 import gemm_a8 as launch

    weight = _weight(qweight, weight_scale, weight_rowsum, weight_bits, in_features, k_split)
    return launch(x, weight, _act(act_scale), _act(act_zp), bias, act_bits, out_dtype)


@gemm_a8.register_fake
def _(x, qweight, weight_scale, weight_rowsum, bias, weight_bits, in_features, k_split, act_scale, act_zp, act_bits,
      out_dtype):  # fmt: skip
    return x.new_empty(x.shape[0], weight_scale.shape[-1], dtype=out_dtype)


@torch.library.custom_op("mixdq::gemm_a8_codes", mutates_args=())
def gemm_a8_codes(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_rowsum: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    act_params: torch.Tensor,
    weight_bits: int,
    in_features: int,
    k_split: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W{8,4,2}A8 Triton GEMM of int8 codes ``x [M, K]``, the quantizers in ``act_params`` (float32 [3, P])."""
    from kernels.gemm_wxa8 import gemm_a8_codes as launch

    weight = _weight(qweight, weight_scale, weight_rowsum, weight_bits, in_features, k_split)
    return launch(x, weight, act_params, bias, out_dtype)


@gemm_a8_codes.register_fake
def _(x, qweight, weight_scale, weight_rowsum, bias, act_params, weight_bits, in_features, k_split, out_dtype):
    return x.new_empty(x.shape[0], weight_scale.shape[-1], dtype=out_dtype)


@torch.library.custom_op("mixdq::unpack_dequant", mutates_args=())
def unpack_dequant(
    data: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, k_split: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed 4- / 2-bit weight ``[N, bytes]`` -> ``codes * scale`` ``[N, in_features]`` in ``dtype`` (Triton)."""
    from kernels.unpack import unpack_dequant as launch

    return launch(data, scale, bits, in_features, None if k_split < 0 else k_split, dtype)


@unpack_dequant.register_fake
def _(data, scale, bits, in_features, k_split, dtype):
    return data.new_empty(data.shape[0], in_features, dtype=dtype)


@torch.library.custom_op("mixdq::unpack_codes_fp8", mutates_args=())
def unpack_codes_fp8(data: torch.Tensor, bits: int, in_features: int, k_split: int) -> torch.Tensor:
    """Packed 4- / 2-bit weight ``[N, bytes]`` -> its integer codes ``[N, in_features]`` in FP8 e4m3 (Triton)."""
    from kernels.unpack import unpack_dequant as launch

    return launch(data, None, bits, in_features, None if k_split < 0 else k_split, torch.float8_e4m3fn)


@unpack_codes_fp8.register_fake
def _(data, bits, in_features, k_split):
    return data.new_empty(data.shape[0], in_features, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("mixdq::unpack_group", mutates_args=())
def unpack_group(
    data: list[torch.Tensor], scales: list[torch.Tensor], bits: list[int], in_features: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Several packed 4- / 2-bit weights -> ``codes * scale`` in ``dtype`` (``scales`` empty: the bare codes),
    flattened one after the other in one 1-D tensor, in one Triton launch (:func:`kernels.unpack.unpack_group`)."""
    from kernels.unpack import unpack_group as launch

    return launch(data, scales or None, bits, in_features, dtype)


@unpack_group.register_fake
def _(data, scales, bits, in_features, dtype):
    return data[0].new_empty(sum(d.shape[0] * k for d, k in zip(data, in_features)), dtype=dtype)


@torch.library.custom_op("mixdq::fp8_lowbit_linear", mutates_args=())
def fp8_lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    out_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    weight_bits: int,
    in_features: int,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """W4A8 / W2A8 on FP8 tensor cores, e4m3 ``x [M, K]`` x packed codes ``[N, bytes]`` unpacked in the GEMM ->
    ``[M, N]`` in ``out_dtype`` (:mod:`kernels.gemm_fp8_lowbit`)."""
    from kernels.gemm_fp8_lowbit import fp8_lowbit_launch as launch

    return launch(x, qweight, weight_bits, in_features, out_scale, bias, out_dtype, fast_accum)


@fp8_lowbit_linear.register_fake
def _(x, qweight, out_scale, bias, weight_bits, in_features, out_dtype, fast_accum=False):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=out_dtype)


@torch.library.custom_op("mixdq::gemm_a16", mutates_args=())
def gemm_a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_rowsum: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    weight_bits: int,
    in_features: int,
    k_split: int,
) -> torch.Tensor:
    """Weight-only W{8,4,2}A16 Triton GEMM, 16-bit ``x [M, K]`` -> ``[M, N]`` in x's dtype."""
    from kernels.gemm_weight_only import gemm_a16 as launch

    return launch(x, _weight(qweight, weight_scale, weight_rowsum, weight_bits, in_features, k_split), bias)


@gemm_a16.register_fake
def _(x, qweight, weight_scale, weight_rowsum, bias, weight_bits, in_features, k_split):
    return x.new_empty(x.shape[0], weight_scale.shape[-1])


def call_gemm_a8(
    x: torch.Tensor,
    weight: PackedWeight,
    act_scale: float | tuple[float, float],
    act_zp: int | tuple[int, int],
    bias: torch.Tensor | None,
    act_bits: int,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """:func:`gemm_a8` with the :mod:`kernels` calling convention (scalars or pairs, a PackedWeight)."""
    scales = [float(s) for s in (act_scale if isinstance(act_scale, tuple) else (act_scale,))]
    zero_points = [int(z) for z in (act_zp if isinstance(act_zp, tuple) else (act_zp,))]
    return torch.ops.mixdq.gemm_a8(
        x, weight.data, weight.scale, weight.rowsum, bias, weight.bits, weight.in_features, _split(weight), scales,
        zero_points, act_bits, out_dtype,
    )  # fmt: skip


def call_gemm_a8_codes(
    x: torch.Tensor, weight: PackedWeight, act_params: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`gemm_a8_codes` with the :mod:`kernels` calling convention."""
    return torch.ops.mixdq.gemm_a8_codes(
        x, weight.data, weight.scale, weight.rowsum, bias, act_params, weight.bits, weight.in_features, _split(weight),
        out_dtype,
    )  # fmt: skip


def call_gemm_a16(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`gemm_a16` with the :mod:`kernels` calling convention."""
    return torch.ops.mixdq.gemm_a16(
        x, weight.data, weight.scale, weight.rowsum, bias, weight.bits, weight.in_features, _split(weight)
    )


def _split(weight: PackedWeight) -> int:
    return -1 if weight.k_split is None else weight.k_split
