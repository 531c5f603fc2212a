"""Which deployed path a layer takes, and which layers can be deployed at all (checked before any change)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kernels import fp8
from mixdq.config import WEIGHT_BITS
from mixdq.quant.layers import CalibrationRequiredError, QuantLayer

# how a deployed quantized conv computes: integer GEMM on patches, or float conv on the unpacked weight.
# The default is the faster one: cuDNN on the unpacked weight beats the int8 GEMM on patches on the GPU, and the
# integer reference is the slower one on the CPU too (bench/results/gpu_unet_h200_2026-11-28.md).
CONV_PATHS = ("gemm", "dequant")
DEFAULT_CONV_PATH = "dequant"

# how a deployed quantized linear computes: our Triton integer GEMM, or cuBLAS on the weight unpacked per call
# (kernels.linear_dequant): one path for every linear, or one per weight bit-width, e.g. {4: "dequant"}.
# "auto" (the default) takes the faster one per layer: the int8 GEMM for W8A8, the dequant path for packed
# int4 / int2 weights and for weight-only layers, whose Triton GEMMs are slower than FP16 cuBLAS at the UNet's
# shapes (bench/results/gpu_unet_h200_2026-11-28.md).
LINEAR_PATHS = ("auto", "gemm", "dequant")
DEFAULT_LINEAR_PATH = "auto"


def auto_linear_path(weight_bits: int, act_bits: int | None) -> str:
    """``"gemm"`` for W8A8 linears, ``"dequant"`` otherwise (see :data:`LINEAR_PATHS`)."""
    return "gemm" if weight_bits == 8 and act_bits is not None else "dequant"


def check_linear_path(linear_path: str | Mapping[int, str]) -> None:
    """Raise ``ValueError`` unless ``linear_path`` is one of :data:`LINEAR_PATHS` or a {bits: path} mapping."""
    paths = linear_path.values() if isinstance(linear_path, Mapping) else [linear_path]
    bad = [p for p in paths if p not in LINEAR_PATHS]
    bad_bits = [b for b in linear_path if b not in WEIGHT_BITS] if isinstance(linear_path, Mapping) else []
    if bad or bad_bits:
        raise ValueError(
            f"linear_path must be one of {list(LINEAR_PATHS)} or a mapping of weight bits {WEIGHT_BITS} to one; "
            f"got {linear_path!r}."
        )


def linear_path_for(linear_path: str | Mapping[int, str], weight_bits: int, act_bits: int | None) -> str:
    """``"gemm"`` or ``"dequant"`` for one layer: a mapping without its bit-width, or "auto", means the rule."""
    path = linear_path.get(weight_bits, "auto") if isinstance(linear_path, Mapping) else linear_path
    return auto_linear_path(weight_bits, act_bits) if path == "auto" else path


@dataclass(frozen=True)
class DeployOptions:
    """How deployed layers compute: :func:`~mixdq.deploy.deploy`'s ``backend`` and path arguments, in one value
    that every layer class reads the part of it needs (``from_quant_layer``)."""

    backend: str = "auto"
    conv_path: str = DEFAULT_CONV_PATH
    linear_path: str | Mapping[int, str] = DEFAULT_LINEAR_PATH
    fp8_fast_accum: bool = False


def check_deployable(layer: QuantLayer, extra_bos: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` for a layer that cannot be packed (checked for all layers before any changes)."""
    if layer.weight_bits is None:
        return
    if layer.bos_aware and layer._bos_inputs is None and extra_bos is None:
        raise ValueError(
            f"{layer.layer_name} is BOS-aware but no BOS vector is known: deploy the pipeline (mixdq.deploy(pipe)) "
            "so its text encoders can supply it, or run one generation with the fake-quant UNet first."
        )
    if layer.act_bits is not None and layer.act_range(layer.act_bits) is None:
        raise CalibrationRequiredError(layer.layer_name, layer.act_bits)
    if layer.fp8 and (layer.act_bits != 8 or not isinstance(layer.fp_module, nn.Linear)):
        raise ValueError(
            f"{layer.layer_name}: FP8 e4m3 deploys A8 linear layers only; it is a {type(layer.fp_module).__name__} "
            f"at W{layer.weight_bits}A{layer.act_bits or 16}."
        )
    conv = layer.fp_module
    if not isinstance(conv, nn.Conv2d):
        return
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        problems.append(f"padding={conv.padding!r} mode {conv.padding_mode!r}")
    if layer.concat_split is not None and conv.kernel_size != (1, 1):
        problems.append(f"a concat-split input with kernel {conv.kernel_size}")
    if problems:
        raise ValueError(
            f"{layer.layer_name}: the quantized conv kernels support groups=1, dilation 1, integer zero padding "
            f"and concat-split inputs on 1x1 convs only; this layer has {', '.join(problems)}. "
            "Keep its weights in FP16 (protect it in the PrecisionConfig)."
        )


def check_fp8_device(unet: nn.Module, layers, kernel_backend: str) -> None:
    """FP8 layers on a CUDA GPU without FP8 tensor cores would fail at their first call: refuse up front."""
    device = next(unet.parameters()).device
    if kernel_backend != "triton" or device.type != "cuda" or not any(q.fp8 and q.weight_bits for q in layers):
        return
    if not fp8.fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"this config runs layers in FP8 e4m3, which needs an NVIDIA GPU of compute capability 8.9 or newer "
            f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is {major}.{minor}. Use the int8 config "
            "(clear its 'fp8' list) or deploy with backend='torch' (the reference path, not faster)."
        )
