"""The quantized linear entry points: activation quantization and the A8 / weight-only / FP8 GEMMs, each running
the Triton kernel (through :mod:`kernels.ops`) on CUDA and the PyTorch integer reference elsewhere."""

from __future__ import annotations

import torch

from kernels import reference
from kernels.backend import resolve_backend
from kernels.pack import PackedWeight


def quantize_act(
    x: torch.Tensor, scale: float, zp: int, bits: int = 8, out: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Float ``x [..., C]`` -> int8 codes ``q - 128`` (into ``out`` when given); see :mod:`kernels.reference`."""
    if resolve_backend(x, backend) == "triton":
        from kernels.act_quant import quantize_act as triton_quantize_act

        return triton_quantize_act(x, scale, zp, bits, out)
    q = reference.quantize_act(x, scale, zp, bits)
    return q if out is None else out.copy_(q)


def quant_linear(
    x: torch.Tensor,
    weight: PackedWeight,
    act_scale: float | tuple[float, float] | None = None,
    act_zp: int | tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    *,
    act_bits: int = 8,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(weight).T + bias`` for ``x [..., K]`` -> ``[..., N]``.

    * ``act_scale``/``act_zp`` given (a pair each when ``weight.k_split`` is set): A8 path. ``x`` is either
      int8 codes from :func:`quantize_act` or float, then quantized first (under torch.compile by graph ops
      that fuse into x's producer). Output in ``out_dtype``,
      by default x's float dtype (float16 for int8 codes): a float32 model on the CPU keeps float32 outputs.
    * ``act_scale`` None: weight-only path, 16-bit ``x``, output in x's dtype.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    use_triton = resolve_backend(x, backend) == "triton"
    if act_scale is None:
        if use_triton:
            from kernels.ops import call_gemm_a16

            y = call_gemm_a16(x2, weight, bias)
        else:
            y = reference.gemm_a16(x2, weight, bias)
    else:
        if act_zp is None:
            raise ValueError("act_zp is required with act_scale (A8 path)")
        if out_dtype is None:
            out_dtype = x.dtype if x.is_floating_point() else torch.float16
        if use_triton:
            from kernels.ops import call_gemm_a8

            if x2.dtype != torch.int8 and torch.compiler.is_compiling():
                # PyTorch ops (the same codes) that Inductor fuses into the op producing x: no separate pass
                x2 = reference.quantize_act_parts(x2, weight, act_scale, act_zp, act_bits)
            y = call_gemm_a8(x2, weight, act_scale, act_zp, bias, act_bits, out_dtype)
        else:
            y = reference.gemm_a8(x2, weight, act_scale, act_zp, bias, act_bits, out_dtype)
    return y.view(*lead, -1)


def quant_linear_codes(
    x: torch.Tensor,
    weight: PackedWeight,
    act_params: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The A8 :func:`quant_linear` of int8 codes ``x [..., K]``, the quantizers as a float32 ``[3, P]`` tensor
    of rows ``(1 / s, zp, s)`` (:func:`reference.act_params_tensor`): what compiled deployed layers call, so the
    compiled code reads no per-layer Python numbers and one compiled block serves every copy of it."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if resolve_backend(x, backend) == "triton":
        from kernels.ops import call_gemm_a8_codes

        y = call_gemm_a8_codes(x2, weight, act_params, bias, out_dtype)
    else:
        y = reference.gemm_a8_codes(x2, weight, act_params, bias, out_dtype)
    return y.view(*lead, -1)


def fp8_lowbit_linear(
    x: torch.Tensor,
    weight: PackedWeight,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    fast_accum: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``(x @ codes.T) * out_scale + bias`` for e4m3 ``x [M, K]`` and a 4- / 2-bit ``weight`` of one K part, in
    ``out_dtype``; ``out_scale [N]`` float32 is the weight's scale per row times x's scale. ``"torch"``: the codes
    unpacked and multiplied in float32 (``fast_accum`` has no effect there)."""
    if resolve_backend(x, backend) == "triton":
        import kernels.ops  # noqa: F401 (registers torch.ops.mixdq.*)

        if weight.k_split is not None:
            raise ValueError(f"fp8_lowbit_linear takes weights of one K part, got k_split={weight.k_split}")
        return torch.ops.mixdq.fp8_lowbit_linear(
            x, weight.data, out_scale, bias, weight.bits, weight.in_features, out_dtype, fast_accum
        )
    y = (x.float() @ weight.codes().float().T) * out_scale.float()
    return (y if bias is None else y + bias.float()).to(out_dtype)
