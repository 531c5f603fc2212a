"""Pure-PyTorch integer reference of every kernel: the tests' oracle and the CPU path of the dispatcher.

Numerics contract (the Triton kernels reproduce it bit for bit in int32, and their float epilogue op for op):

* activation quantization, per tensor, asymmetric, ``b_a`` in {4, 8} bits, integer zero-point ``zp``::

      q      = clamp(round_half_even(float32(x) * (1 / float32(s_a))) + zp, 0, 2**b_a - 1)  (unsigned code)
      x_int8 = q - 128                                                                     (signed, what GEMMs read)

  (multiplying by the fp32 reciprocal, like ``mixdq.quant.primitives`` and torch's fused fake-quant,
  so deployed codes equal the fake-quant codes.)

* A8 GEMM, weight codes ``w[n, k]`` (see :mod:`kernels.pack`), ``rowsum[n] = sum_k w[n, k]``::

      acc[m, n] = sum_k x_int8[m, k] * w[n, k]                                  (int32)
      y[m, n]   = float32(acc + (128 - zp) * rowsum[n]) * (s_a * s_w[n]) + bias[n]   -> float16

  since ``(q - zp) = x_int8 + 128 - zp``. With a K split (concat input) each part p has its own
  ``(s_a_p, zp_p)``, accumulator, row sum and weight scale row ``s_w_p`` (``scale [2, N]``), and the parts'
  float terms ``float32(acc_p + (128 - zp_p) * rowsum_p[n]) * (s_a_p * s_w_p[n])`` are added in order, then
  the bias.

* A16 (weight-only) GEMM: ``y = float32(x @ w.T) * s_w[n] + bias[n]`` with fp32 accumulation; with a K split
  one accumulator per part, ``y = acc_0 * s_w_0[n] + acc_1 * s_w_1[n] + bias[n]``.

Integer matmuls run in float64, which is exact for these magnitudes (|acc| < 2**31 < 2**53) and fast on CPU.
"""

from __future__ import annotations

import itertools
import struct

import torch

from kernels.pack import PackedWeight, part_bounds, qmax

ACT_OFFSET = 128  # x_int8 = q - ACT_OFFSET: unsigned 8-bit codes shifted into int8
ACT_BITS = (4, 8)  # mixdq.config.ACT_BITS (tests/test_architecture.py checks the two agree)


def quantize_weight(w: torch.Tensor, bits: int, k_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric min-max: int8 codes ``[N, K]`` in [-qmax, qmax] and float32 scale ``[N]``;
    with ``k_split`` each K part gets its own scales, ``[2, N]`` (the layout of :class:`PackedWeight`)."""
    codes, scales = [], []
    bounds = part_bounds(w.shape[1], k_split)
    for a, b in itertools.pairwise(bounds):
        amax = w[:, a:b].detach().float().abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax))
        codes.append(torch.clamp(torch.round(w[:, a:b].float() / scale[:, None]), -qmax(bits), qmax(bits)))
        scales.append(scale)
    q = torch.cat(codes, dim=1).to(torch.int8)
    return q, (scales[0] if k_split is None else torch.stack(scales))


def act_parts(
    weight: PackedWeight, act_scale: float | tuple[float, float], act_zp: int | tuple[int, int]
) -> list[tuple[int, int, float, int]]:
    """``[(k_start, k_end, scale, zp), ...]``: one entry per K part of the weight's input."""
    bounds = part_bounds(weight.in_features, weight.k_split)
    scales = act_scale if isinstance(act_scale, (tuple, list)) else (act_scale,)
    zps = act_zp if isinstance(act_zp, (tuple, list)) else (act_zp,)
    if len(scales) != len(bounds) - 1 or len(zps) != len(bounds) - 1:
        raise ValueError(
            f"the weight has {len(bounds) - 1} input part(s) (k_split={weight.k_split}); "
            f"got {len(scales)} activation scale(s) and {len(zps)} zero-point(s)"
        )
    return [(a, b, float(s), int(z)) for a, b, s, z in zip(bounds, bounds[1:], scales, zps)]


def check_act_params(scale: float, zp: int, bits: int) -> None:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits!r}")
    if not 0 <= zp <= 2**bits - 1 or int(zp) != zp:
        raise ValueError(f"activation zero-point must be an integer in [0, {2**bits - 1}], got {zp!r}")
    if not scale > 0:
        raise ValueError(f"activation scale must be > 0, got {scale!r}")


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def inv_scale(scale: float) -> float:
    """``1 / scale`` rounded to float32, the multiplier every quantizer here uses.

    Equal to ``float(1 / torch.tensor(scale, dtype=torch.float32))``: a float32 quotient computed in float64 and
    rounded once is correctly rounded. Plain Python, so torch.compile folds it to a constant (no ``.item()``).
    """
    return _float32(1.0 / _float32(scale))


def quantize_act(x: torch.Tensor, scale: float, zp: int, bits: int = 8) -> torch.Tensor:
    """Float activations (any shape) -> int8 ``q - 128`` of the same shape (see the module docstring)."""
    check_act_params(scale, zp, bits)
    return quantize_act_tensors(x, torch.tensor(inv_scale(scale), dtype=torch.float32), zp, bits)


def quantize_act_tensors(
    x: torch.Tensor, inv_scale_t: torch.Tensor, zp_t: torch.Tensor | int, bits: int = 8
) -> torch.Tensor:
    """The quantizer itself, ``1 / s`` as a float32 tensor and ``zp`` as a float32 tensor (or an int).

    :func:`quantize_act` calls it with Python numbers turned into constants; deployed layers under
    torch.compile call it with tensor buffers, because Inductor bakes Python numbers into the kernels it generates, so every layer's quantizer
    became its own kernel to compile (~720 unique kernels for an SDXL UNet vs ~60 in FP16); tensors are kernel
    arguments, and layers with the same shapes share one kernel.
    """
    return (_act_codes(x, inv_scale_t, zp_t, bits) - ACT_OFFSET).to(torch.int8)


def _act_codes(x: torch.Tensor, inv_scale_t: torch.Tensor, zp_t: torch.Tensor | int, bits: int) -> torch.Tensor:
    """Unsigned codes ``q`` as float32 (exact small integers): the one formula of the module docstring."""
    return torch.clamp(torch.round(x.float() * inv_scale_t) + zp_t, 0, 2**bits - 1)


def fake_quantize_act_tensors(
    x: torch.Tensor, inv_scale_t: torch.Tensor, zp_t: torch.Tensor, scale_t: torch.Tensor, bits: int = 8
) -> torch.Tensor:
    """``(q - zp) * s`` in x's dtype: x rounded to its activation grid, torch's fused fake-quant formula."""
    return ((_act_codes(x, inv_scale_t, zp_t, bits) - zp_t) * scale_t).to(x.dtype)


def quantize_act_parts_tensors(
    x: torch.Tensor, inv_scale_t: torch.Tensor, zp_t: torch.Tensor, k_split: int | None, bits: int = 8
) -> torch.Tensor:
    """Float ``x [..., K]`` -> int8 codes; part p (split at ``k_split``) uses ``inv_scale_t[p]``, ``zp_t[p]``."""
    if k_split is None:
        return quantize_act_tensors(x, inv_scale_t[0], zp_t[0], bits)
    parts = (x[..., :k_split], x[..., k_split:])
    return torch.cat([quantize_act_tensors(p, inv_scale_t[i], zp_t[i], bits) for i, p in enumerate(parts)], -1)


def quantize_act_parts(
    x: torch.Tensor, weight: PackedWeight, act_scale: float | tuple, act_zp: int | tuple, act_bits: int = 8
) -> torch.Tensor:
    """Float ``x [M, K]`` -> int8 codes, each K part of ``weight`` (see :func:`act_parts`) with its own quantizer."""
    codes = [quantize_act(x[:, a:b], s, z, act_bits) for a, b, s, z in act_parts(weight, act_scale, act_zp)]
    return codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] @ w[N, K].T`` of integer tensors (|result| < 2**31) -> int32 ``[M, N]``."""
    return (a.double() @ w.double().T).to(torch.int32)


def act_params_tensor(
    weight: PackedWeight, act_scale: float | tuple, act_zp: int | tuple, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The activation quantizers of ``weight``'s input parts as one float32 ``[3, P]`` tensor of rows
    ``(1 / s, zp, s)``: how deployed layers hold them, so compiled code reads no per-layer Python numbers."""
    rows = [[inv_scale(s), float(z), s] for _, _, s, z in act_parts(weight, act_scale, act_zp)]
    return torch.tensor(rows, dtype=torch.float32, device=device).T.contiguous()


def gemm_a8(
    x: torch.Tensor,
    weight: PackedWeight,
    act_scale: float | tuple[float, float],
    act_zp: int | tuple[int, int],
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
    out_dtype: torch.dtype = torch.float16,
    return_acc: bool = False,
) -> torch.Tensor:
    """W{8,4,2}A8: ``x [M, K]`` int8 codes (``q - 128``) or float (quantized here) -> ``[M, N]`` out_dtype.

    ``return_acc=True`` returns the int32 ``sum_p (acc_p + (128 - zp_p) * rowsum_p)`` = ``sum_k (q - zp) w``.
    """
    for _, _, s, z in act_parts(weight, act_scale, act_zp):
        check_act_params(s, z, act_bits)
    if x.dtype != torch.int8:
        x = quantize_act_parts(x, weight, act_scale, act_zp, act_bits)
    params = act_params_tensor(weight, act_scale, act_zp, x.device)
    return gemm_a8_codes(x, weight, params, bias, out_dtype, return_acc)


def gemm_a8_codes(
    x: torch.Tensor,
    weight: PackedWeight,
    act_params: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    return_acc: bool = False,
) -> torch.Tensor:
    """:func:`gemm_a8` of int8 codes ``x [M, K]`` with the quantizers as a tensor (:func:`act_params_tensor`)."""
    w = weight.codes()
    _, zp, scale = act_params.float().unbind()
    sw = [s.float() for s in weight.part_scales()]
    total = torch.zeros(x.shape[0], w.shape[0], dtype=torch.int32, device=x.device)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    bounds = part_bounds(weight.in_features, weight.k_split)
    for p, (a, b) in enumerate(itertools.pairwise(bounds)):
        tot = int_matmul(x[:, a:b], w[:, a:b]) + (ACT_OFFSET - zp[p]).to(torch.int32) * weight.rowsum[p]
        total += tot
        y += tot.float() * (scale[p] * sw[p])
    if return_acc:
        return total
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


def gemm_a16(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Weight-only W{8,4,2}A16: float ``x [M, K]`` -> ``[M, N]`` (out_dtype defaults to x's dtype)."""
    w = weight.codes().float()
    bounds = part_bounds(weight.in_features, weight.k_split)
    y = None
    for (a, b), sw in zip(itertools.pairwise(bounds), weight.part_scales()):
        term = (x[:, a:b].float() @ w[:, a:b].T) * sw.float()
        y = term if y is None else y + term
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype or x.dtype)
