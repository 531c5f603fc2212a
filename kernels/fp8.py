"""FP8 e4m3 linear layers: the 8-bit format Hopper and Ada GPUs multiply fastest.

cuBLAS's FP8 GEMM (``torch._scaled_mm``) is ~1.4x faster than FP16 at the SDXL UNet's linear shapes on an
H200, while int8 (ours or ``torch._int_mm``) is no faster than FP16 there (``bench/gpu_kernels.py``). FP8 is
also a different grid from int8: 3 mantissa bits, so a roughly constant *relative* rounding error instead of
a constant step. A model that runs FP8 must be simulated with FP8 to keep quality numbers honest, so the
formulas live here once and :mod:`mixdq.quant` fake-quantizes with them.

Format (the per-tensor "tensorwise" recipe, what ``_scaled_mm`` runs in one cuBLAS call with bias and FP16
output): ``x ~= scale * q`` with ``q = e4m3(clamp(x / scale, -448, 448))``, round to nearest even, one
float32 scale per tensor. Weights: ``scale = max|w| / 448``. Activations: ``scale = max(|lo|, |hi|) / 448``
from the same calibrated range the int8 quantizer uses (FP8 is symmetric: no zero point). e4m3's exponent
covers ~2^17 of dynamic range, which is why one scale per tensor suffices where int8 needs one per channel.

4- and 2-bit weights are not re-quantized: their integer codes (|q| <= 8) are e4m3 values exactly, so a W4A8 /
W2A8 layer in FP8 keeps its own grid and per-channel scales, and only its activations become e4m3; cuBLAS
multiplies with the "row-wise" recipe (a scale per output channel, ``scale_b (1, N)``), which also carries FP8
layers fused along N (:mod:`mixdq.deploy.fuse`). Measured on an H200: ``bench/results/gpu_unet_h200_2026-11-28.md``.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# cuBLAS FP8 needs K and N to be multiples of 16; other shapes run the reference path
FP8_ALIGN = 16
# compute capability of the first GPUs with FP8 tensor cores (Ada 8.9, Hopper 9.0)
FP8_MIN_CAPABILITY = (8, 9)


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale mapping ``absmax`` to e4m3's largest value; 1 for an all-zero tensor (codes all 0)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(x * (1 / scale)))``: the one formula for activations, fake and real.

    Clamped first because a float -> e4m3fn cast of anything beyond 448 is NaN (the format has no infinity).
    Plain tensor ops: under torch.compile Inductor fuses them into the op that produced ``x``.
    """
    return torch.clamp(x.float() * inv_scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes e4m3 same shape as w, float32 scale scalar)`` with ``scale = max|w| / 448``."""
    scale = fp8_scale(w.detach().float().abs().amax())
    codes = torch.clamp(w.detach().float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


ONES_ROWS = 1 << 16  # rows of the cached column: SDXL at 1024 px has 4096 tokens, so batches up to 16 fit
_ONES: dict[torch.device, torch.Tensor] = {}


def ones_column(rows: int, device: torch.device) -> torch.Tensor:
    """``(rows, 1)`` float32 ones, a view of one cached column per device: row-wise cuBLAS FP8's ``scale_a``.

    ``_scaled_mm`` refuses a 0-d or stride-0 ``scale_a`` beside a row-wise ``scale_b`` (torch 2.11), so the
    column must exist in memory; a view of a cached one costs no kernel per call, also in a compiled graph,
    where the cache is a global tensor. It is made on first use outside compilation (deployed FP8 layers make
    it when they reach their device); a traced call that finds none, or too short a one, makes its own.
    """
    cached = _ONES.get(device)
    if cached is None or cached.shape[0] < rows:
        if torch.compiler.is_compiling():
            return torch.ones(rows, 1, device=device, dtype=torch.float32)
        cached = _ONES[device] = torch.ones(max(rows, ONES_ROWS), 1, device=device, dtype=torch.float32)
    return cached[:rows]


def fp8_supported(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def fp8_shape_ok(in_features: int, out_features: int) -> bool:
    """cuBLAS FP8 takes this (K, N)."""
    return in_features % FP8_ALIGN == 0 and out_features % FP8_ALIGN == 0


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act_inv_scale: torch.Tensor,
    act_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    use_scaled_mm: bool,
    out_scale: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``y = dequant(e4m3(x)) @ (weight * weight_scale).T + bias`` for float ``x [..., K]``, in x's dtype.

    ``weight`` e4m3 ``(N, K)``; the scales are float32, ``act_inv_scale = 1 / act_scale`` 0-d, ``weight_scale``
    0-d (one per tensor: an FP8 W8A8 layer) or ``(N,)`` (one per output channel: 4- / 2-bit integer codes,
    which e4m3 holds exactly, or FP8 layers fused along N). ``use_scaled_mm``: cuBLAS FP8 through
    ``torch._scaled_mm`` (CUDA, capability >= 8.9, K and N multiples of 16; per-channel scales as its
    row-wise recipe, ``scale_a (M, 1)`` and ``scale_b (1, N)``), products exact and accumulated in float32;
    otherwise the reference: the same codes dequantized and multiplied in float32 (CPU) or x's dtype (GPU),
    which is what the fake-quant layer computes.

    Row-wise, the activation scale rides in ``scale_b`` (``out_scale = weight_scale * act_scale``, ``(N,)``;
    deployed layers pass it precomputed) and ``scale_a`` is a slice of a cached column of ones
    (:func:`ones_column`): building an ``(M, 1)`` column per call was one small kernel per GEMM, ~0.3-0.5 ms of
    an SDXL step on an H200. ``fast_accum``: cuBLAS's fast accumulation (``use_fast_accum``, not on the
    reference path): faster at most UNet shapes, at ~3e-3 relative error of the GEMM instead of ~4e-4
    (``bench/lab/fp8_recipe_probe.py``), which the fake-quant model does not simulate.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    # contiguous: cuBLAS FP8 takes a row-major left operand, and x is often a transposed view (diffusers'
    # proj_in gets NCHW permuted to tokens-last); under torch.compile the quantizing kernel writes it so
    q = quantize_fp8(x.reshape(-1, K), act_inv_scale).contiguous()
    per_channel = weight_scale.dim() == 1
    if use_scaled_mm:
        scale_a, scale_b = act_scale, weight_scale
        if per_channel:
            scale_a = ones_column(q.shape[0], q.device)
            scale_b = (weight_scale * act_scale if out_scale is None else out_scale).reshape(1, -1)
        bias = None if bias is None else bias.to(x.dtype)
        y = torch._scaled_mm(q, weight.t(), scale_a, scale_b, bias=bias, out_dtype=x.dtype, use_fast_accum=fast_accum)
    else:
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        a = (q.to(torch.float32) * act_scale).to(compute)
        w_scale = weight_scale.float()[:, None] if per_channel else weight_scale
        w = (weight.to(torch.float32) * w_scale).to(compute)
        y = torch.nn.functional.linear(a, w, None if bias is None else bias.to(compute)).to(x.dtype)
    return y.view(*lead, -1)
