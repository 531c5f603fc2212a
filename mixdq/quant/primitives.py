"""Pure tensor functions of MixDQ's quantizers (no modules, no state).

Weights: per-output-channel symmetric min-max. Row ``r`` of a weight ``w`` (out, ...) at ``b`` bits has
``scale[r] = max|w[r]| / qmax_b`` with ``qmax_b = 2^(b-1) - 1`` and codes in ``[-qmax_b, qmax_b]``:
8-bit [-127, 127], 4-bit [-7, 7], 2-bit ternary [-1, 1]. The range always contains 0 and 0 is code 0.

Activations: static per-tensor asymmetric min-max. A calibrated range ``[lo, hi]`` is first widened to
contain 0, then ``scale = (hi - lo) / (2^b - 1)`` and ``zero_point = round(-lo / scale)``; codes are
unsigned in ``[0, 2^b - 1]`` and 0 maps to the integer code ``zero_point``, so it is exact.

Rounding is ``torch.round`` (half to even) everywhere. Scales and ranges are float32 tensors.
"""

from __future__ import annotations

import torch

from kernels.fp8 import fp8_scale, quantize_fp8, quantize_fp8_weight
from mixdq.config import WEIGHT_BITS

# MixDQ's EMA momentum for activation ranges: new = momentum * old + (1 - momentum) * batch.
EMA_MOMENTUM = 0.95


# ---- weights ----------------------------------------------------------------------------------------
def weight_qmax(bits: int) -> int:
    """Largest weight code at ``bits``: symmetric codes lie in ``[-qmax, qmax]``."""
    return 2 ** (bits - 1) - 1


def weight_scales(
    w: torch.Tensor, bits: tuple[int, ...] = WEIGHT_BITS, split: int | None = None
) -> dict[int, torch.Tensor]:
    """Per-output-channel scales (float32) for every candidate bit, from one pass over ``w``.

    Shape ``(out,)``; with ``split = c`` (a concat input, see :func:`weight_slices`) ``(2, out)``: input
    channels ``[:c]`` and ``[c:]`` get a scale each, as MixDQ's two weight quantizers of a split shortcut
    do, so the small-magnitude slice is not rounded on the grid of the large one. One absolute-max
    reduction serves all bit-widths, so a 2- or 4-bit scale can never be an 8-bit scale in disguise. An
    all-zero row gets scale 1 (its codes are all 0 whatever the scale); only that entry is replaced.
    """
    absmax = torch.stack([_rows(part).abs().amax(dim=1) for part in weight_slices(w.detach(), split)])
    absmax = absmax[0] if split is None else absmax
    return {b: torch.where(absmax > 0, absmax / weight_qmax(b), torch.ones_like(absmax)) for b in bits}


def weight_slices(w: torch.Tensor, split: int | None) -> tuple[torch.Tensor, ...]:
    """``w`` itself, or its two input-channel slices ``w[:, :split]`` and ``w[:, split:]`` (dim 1 is the
    input channels of a Linear ``(out, in)`` and a Conv2d ``(out, in, kh, kw)`` weight alike)."""
    if split is None:
        return (w,)
    if not 0 < split < w.shape[1]:
        raise ValueError(f"weight split must lie in (0, {w.shape[1]}), got {split}")
    return (w[:, :split], w[:, split:])


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.float().reshape(w.shape[0], -1)


# Candidate clipping ratios of the min-max scale for MSE-clipped weights (1.00, 0.98, ..., 0.20).
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(41))


def weight_scales_mse(
    w: torch.Tensor, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS, split: int | None = None
) -> torch.Tensor:
    """Per-output-channel scales (float32 ``(out,)``, or ``(2, out)`` with ``split``) that minimise each row's
    (each row slice's) squared rounding error.

    Min-max (MixDQ's rule) makes the largest weight of a row exact and rounds the rest coarsely; at 2 bits
    (ternary) a weight becomes non-zero only above half the row's maximum, which zeroes ~95% of a Gaussian row.
    Clipping trades a few saturated outliers for a finer grid: each row takes the ratio of its min-max scale,
    from ``ratios``, with the least squared error. Ratio 1.0 is a candidate, so no row gets worse than min-max
    (on the embedded model's UNet: 2-bit 3.8 -> 9.0 dB weight SQNR, 4-bit 21.2 -> 22.1, 8-bit unchanged).
    The codes stay symmetric in ``[-qmax, qmax]``: kernels, packing and memory are those of min-max.
    """
    scales = torch.stack([_row_scales_mse(_rows(part), bits, ratios) for part in weight_slices(w.detach(), split)])
    return scales[0] if split is None else scales


def _row_scales_mse(rows: torch.Tensor, bits: int, ratios: tuple[float, ...]) -> torch.Tensor:
    base = weight_scales(rows, (bits,))[bits]
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for ratio in ratios:
        scale = base * ratio
        err = (_weight_codes(rows, scale, bits).mul_(scale[:, None]) - rows).square_().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def _per_row(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """View a ``(out,)`` scale so it broadcasts over a weight of any rank."""
    return scale.view(-1, *([1] * (w.dim() - 1)))


def _slice_scales(scale: torch.Tensor, w: torch.Tensor, split: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(weight slice, its (out,) scale), ...]``: one pair, or two for a ``(2, out)`` scale and a ``split``."""
    if (scale.dim() == 2) != (split is not None):
        raise ValueError(
            f"a weight scale of shape {tuple(scale.shape)} needs "
            f"{'a split' if scale.dim() == 2 else 'no split'} (got split={split})"
        )
    parts = weight_slices(w, split)
    return list(zip(parts, scale.unbind(0) if split is not None else (scale,)))


def _weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, split: int | None = None) -> torch.Tensor:
    """Symmetric codes as float32 (exact small integers) in ``[-qmax, qmax]``, each weight slice on its scale.

    In-place after the one division: on the CPU, allocating full-size temporaries costs more than the math.
    """
    qmax = weight_qmax(bits)
    codes = [
        (part.float() / _per_row(s, part)).round_().clamp_(-qmax, qmax) for part, s in _slice_scales(scale, w, split)
    ]
    return codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)


def _scaled(codes: torch.Tensor, scale: torch.Tensor, split: int | None) -> torch.Tensor:
    """Float32 ``codes * scale``, slice by slice (in place on a float32 ``codes``)."""
    parts = [part.float().mul_(_per_row(s, part)) for part, s in _slice_scales(scale, codes, split)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, split: int | None = None) -> torch.Tensor:
    """Integer codes (int8, same shape as ``w``) in ``[-qmax, qmax]``; a ``(2, out)`` scale needs its ``split``."""
    return _weight_codes(w, scale, bits, split).to(torch.int8)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, split: int | None = None
) -> torch.Tensor:
    """``codes * scale`` per output channel (and input slice, with ``split``), in ``dtype``."""
    return _scaled(codes.float().clone() if codes.dtype == torch.float32 else codes.float(), scale, split).to(dtype)


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, split: int | None = None) -> torch.Tensor:
    """``w`` rounded to its ``bits``-bit grid, in ``w``'s dtype (what an integer kernel would compute with)."""
    return _scaled(_weight_codes(w, scale, bits, split), scale, split).to(w.dtype)


# ---- activations ------------------------------------------------------------------------------------
def act_qmax(bits: int) -> int:
    """Largest unsigned activation code at ``bits``: codes lie in ``[0, qmax]``."""
    return 2**bits - 1


def act_qparams(act_range: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) tensors for a ``[..., 2]`` range ``(lo, hi)``.

    The range is widened to contain 0 so that 0 (padding, ReLU/SiLU zeros) is exact. A degenerate range
    (``lo == hi == 0``, e.g. an input that was all zeros during calibration) gets the smallest positive
    scale, like torch.ao's observers, instead of dividing by zero.
    """
    lo = torch.clamp(act_range[..., 0].float(), max=0.0)
    hi = torch.clamp(act_range[..., 1].float(), min=0.0)
    qmax = act_qmax(bits)
    scale = torch.clamp((hi - lo) / qmax, min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def quantize_act(x: torch.Tensor, act_range: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes (int32, same shape as ``x``) in ``[0, 2^bits - 1]`` for a ``(2,)`` range.

    Multiplies by ``1 / scale`` like torch's fused fake-quant kernel, so both give identical codes.
    """
    scale, zero_point = act_qparams(act_range, bits)
    return torch.clamp(torch.round(x.float() * (1.0 / scale)) + zero_point, 0, act_qmax(bits)).to(torch.int32)


def dequantize_act(
    codes: torch.Tensor, act_range: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in ``dtype``."""
    scale, zero_point = act_qparams(act_range, bits)
    return ((codes - zero_point).float() * scale).to(dtype)


def fake_quantize_act(x: torch.Tensor, act_range: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to the ``bits``-bit grid of a ``(2,)`` range, in ``x``'s dtype; values outside are clipped.

    Equals ``dequantize_act(quantize_act(x))``.
    """
    return fake_quantize_act_qparams(x, *act_qparams(act_range, bits), bits)


def fake_quantize_act_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """:func:`fake_quantize_act` from precomputed ``act_qparams``, as torch's single fused kernel.

    Activations are fake-quantized on every forward of every layer: this is the hot path of simulation,
    so layers compute their qparams once per range change and call this.
    """
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, act_qmax(bits))


# ---- FP8 e4m3 (8-bit layers of a config's ``fp8`` list; the formulas are kernels.fp8's) --------------
def fp8_act_qparams(act_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) float32 tensors ``(...,)`` for a ``[..., 2]`` range: ``max(|lo|, |hi|) / 448``.

    The same calibrated range as the int8 quantizer; FP8 is symmetric, so the wider side sets the scale.
    """
    absmax = torch.maximum(-act_range[..., 0].float(), act_range[..., 1].float()).clamp(min=0.0)
    scale = fp8_scale(absmax)
    return scale, 1.0 / scale


def fake_quantize_weight_fp8(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its per-tensor-scaled e4m3 grid, in ``w``'s dtype."""
    codes, scale = quantize_fp8_weight(w)
    return (codes.float() * scale).to(w.dtype)


def fake_quantize_act_fp8(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the e4m3 grid of one (scale, 1 / scale) pair, in ``x``'s dtype; beyond 448 clipped."""
    return (quantize_fp8(x, inv_scale).float() * scale).to(x.dtype)


# ---- calibration ------------------------------------------------------------------------------------
def observe_min_max(x: torch.Tensor, previous: torch.Tensor | None, momentum: float = EMA_MOMENTUM) -> torch.Tensor:
    """EMA min-max observer: the updated ``(2,)`` float32 range ``(lo, hi)`` after seeing ``x``.

    The first batch (``previous is None``) sets the range; later batches move it by ``1 - momentum``,
    so a single outlier batch cannot blow up the range the way a running max would.
    """
    batch = torch.stack(torch.aminmax(x.detach())).float()
    if previous is None:
        return batch
    return momentum * previous + (1.0 - momentum) * batch
