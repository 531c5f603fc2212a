"""``deploy``: the transform that swaps every fake-quant layer of a UNet for its deployed module, and its report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kernels
from mixdq.config import WEIGHT_BITS, PrecisionConfig
from mixdq.deploy.layers import (
    DEPLOYED_TYPES,
    DeployedConv2d,
    DeployedFP8CodesLinear,
    DeployedFP8Linear,
    DeployedLinear,
)
from mixdq.deploy.policy import (
    CONV_PATHS,
    DEFAULT_CONV_PATH,
    DEFAULT_LINEAR_PATH,
    DeployOptions,
    check_deployable,
    check_fp8_device,
    check_linear_path,
)
from mixdq.inventory import layer_inventory, non_layer_param_count
from mixdq.memory import MB, layer_weight_bytes, weight_memory
from mixdq.quant.api import quant_layers, quantize_, unet_of
from mixdq.quant.layers import QuantLayer


def _nbytes(module: nn.Module) -> int:
    """Exact bytes of every parameter and buffer a module holds."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# which module replaces a layer with quantized weights, by (kind, weight bits, FP8): FP8 is for A8 linears only
# (check_deployable refuses the rest); a layer with FP weights has no entry, it stays a QuantLayer (W16A8) or goes
# back to its float module (see deploy_layer)
LAYER_CLASSES: dict[tuple[str, int, bool], type[nn.Module]] = {
    **{("linear", bits, False): DeployedLinear for bits in WEIGHT_BITS},
    **{("conv", bits, False): DeployedConv2d for bits in WEIGHT_BITS},
    ("linear", 8, True): DeployedFP8Linear,  # e4m3 weights
    **{("linear", bits, True): DeployedFP8CodesLinear for bits in WEIGHT_BITS if bits != 8},  # codes unpacked
}


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` for an ``nn.Conv2d``, else ``"linear"``: the first part of a :data:`LAYER_CLASSES` key."""
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def layer_class(kind: str, weight_bits: int, fp8: bool) -> type[nn.Module]:
    """The :data:`LAYER_CLASSES` entry of a layer with quantized weights."""
    key = (kind, weight_bits, bool(fp8))
    if key not in LAYER_CLASSES:
        raise ValueError(f"no deployed layer for (kind, weight bits, fp8) = {key}; valid: {sorted(LAYER_CLASSES)}.")
    return LAYER_CLASSES[key]


def deploy_layer(
    layer: QuantLayer,
    backend: str = "auto",
    extra_bos: torch.Tensor | None = None,
    conv_path: str = DEFAULT_CONV_PATH,
    linear_path: str | Mapping[int, str] = DEFAULT_LINEAR_PATH,
    fp8_fast_accum: bool = False,
) -> nn.Module:
    """The module that replaces one fake-quant layer (see the :mod:`mixdq.deploy` docstring for the cases).

    A BOS-aware layer precomputes the full-precision output of the all-zeros vector, of the token-0 vectors
    the fake layer cached, and of ``extra_bos`` ``(K, C_in)`` (the pipeline's BOS state).
    """
    check_deployable(layer, extra_bos)
    if layer.weight_bits is None:
        return layer if layer.act_bits is not None else layer.fp_module
    cls = layer_class(layer_kind(layer.fp_module), layer.weight_bits, layer.fp8)
    options = DeployOptions(backend, conv_path, linear_path, fp8_fast_accum)
    return cls.from_quant_layer(layer, options, extra_bos)


@dataclass(frozen=True)
class DeployedLayerReport:
    """One layer after :func:`deploy`."""

    name: str
    precision: str  # "W4A8", "W4A16" (weight-only), "W16A8" (activation-only), "FP16"
    # "triton", "cuBLAS FP8", "unpack + cuBLAS FP8", "dequant + conv" / "dequant + matmul" (packed weight
    # unpacked per call, float conv / matmul), "torch reference" (integer kernels' PyTorch path), "fake-quant",
    # "torch" (float)
    backend: str
    nbytes: int  # every tensor the layer's module holds, exact
    accounted_bytes: int  # mixdq.memory.layer_weight_bytes at its weight bits


@dataclass(frozen=True)
class DeployReport:
    """What :func:`deploy` made: per-layer precision and backend, and the exact bytes held.

    ``weight_bytes`` counts every parameter and buffer of the deployed UNet in the dtype it is held in (float32
    on a CPU model). It exceeds the planner's ``accounted_bytes`` (:func:`mixdq.memory.weight_memory`) by
    what the kernels keep beyond ``ceil(K * bits / 8)`` packed bytes + one FP16 scale per input part + FP16 bias
    per row: float32 scales (+2 B per row and input part), int32 row sums for the A8 zero-point correction (+4 B per row and input
    part), 4- and 2-bit rows padded to whole 128-code chunks per input part (:mod:`kernels.pack`), the
    activation quantizers as tensors for torch.compile and the dequantizing conv (12 B per input part), the BOS
    K/V caches, FP8 layers' three float32 scales (vs an FP16 scale per row), the buffers of layers left on the fake
    path, and float tensors wider than FP16.
    """

    layers: tuple[DeployedLayerReport, ...]
    weight_bytes: int
    accounted_bytes: int
    fp16_bytes: int  # the same UNet with every weight in FP16
    dtype: torch.dtype  # the UNet's float dtype
    kernel_backend: str  # "triton" or "torch": where the packed layers' kernels run

    @property
    def ratio(self) -> float:
        """How many times smaller than the FP16 UNet the deployed weights are."""
        return self.fp16_bytes / self.weight_bytes

    def describe(self) -> str:
        """One line for logs and the studio."""
        counts = Counter(layer.precision for layer in self.layers).most_common()
        mix = ", ".join(f"{n} {precision}" for precision, n in counts)
        if self.kernel_backend == "triton":
            path = "Triton kernels on CUDA"
        elif torch.cuda.is_available():
            path = "PyTorch reference path (backend='torch')"
        else:
            path = "CPU reference path (no CUDA)"
        held = (
            "" if self.dtype == torch.float16 else f", float tensors held in {str(self.dtype).removeprefix('torch.')}"
        )
        return (
            f"deployed {len(self.layers)} layers: {mix}; weights {self.weight_bytes / MB:.1f} MB "
            f"(vs {self.fp16_bytes / MB:.1f} MB FP16, {self.ratio:.1f}x{held}); {path}"
        )


def _unet_dtype(unet: nn.Module) -> torch.dtype:
    return next(p.dtype for p in unet.parameters() if p.is_floating_point())


def _pipeline_bos(model: Any, unet: nn.Module) -> torch.Tensor | None:
    """``(1, C)`` token 0 of the pipeline's text embedding of the empty prompt (``None`` for a bare UNet).

    With causal attention the BOS token attends only to itself, so this is token 0 of every prompt's embedding.
    """
    if model is unet or not hasattr(model, "encode_prompt"):
        return None
    embeds = model.encode_prompt(
        prompt="", device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    return embeds[0, :1]


@torch.no_grad()
def deploy(
    model: Any,
    config: PrecisionConfig | None = None,
    act_ranges=None,
    backend: str = "auto",
    conv_path: str = DEFAULT_CONV_PATH,
    linear_path: str | Mapping[int, str] = DEFAULT_LINEAR_PATH,
    fp8_fast_accum: bool = False,
) -> DeployReport:
    """Replace the fake-quant layers of ``model``'s UNet (a pipeline or the UNet) by packed-integer layers.

    ``config`` (with ``act_ranges`` from :func:`mixdq.calibrate.calibrate` if it quantizes activations) is
    applied first with :func:`~mixdq.quant.quantize_`; without it the UNet must already be fake-quantized.
    Every layer is checked before the first one is replaced. Deployment is one way: the FP weights of the
    packed layers are dropped (memory returns once no one else holds the old layers), so ``quantize_``,
    ``quantization_off`` and sensitivity sweeps do not apply to the result; deploy a copy to keep both.
    On CUDA the UNet must be float16/bfloat16 (the Triton kernels' activation types). ``conv_path``:
    how quantized convs compute (:class:`DeployedConv2d`; both hold packed weights): ``"dequant"`` (default,
    the faster one, see :data:`DEFAULT_CONV_PATH`) or ``"gemm"`` (the integer GEMM on patches).
    ``linear_path``: how integer linears compute (:class:`DeployedLinear`): ``"auto"`` (default: the
    faster path per layer kind), ``"gemm"`` or ``"dequant"``, or a mapping from weight bits to one of
    them (see :data:`LINEAR_PATHS`). ``fp8_fast_accum``: FP8 layers multiply with cuBLAS's fast
    accumulation (faster, but each GEMM's error is ~3e-3 relative instead of ~4e-4, which the fake-quant model
    does not simulate: off by default; bench/results/fp8_recipe_probe_h200_2026-11-28.md).
    """
    if backend not in kernels.BACKENDS:
        raise ValueError(f"backend must be one of {list(kernels.BACKENDS)}, got {backend!r}.")
    if conv_path not in CONV_PATHS:
        raise ValueError(f"conv_path must be one of {list(CONV_PATHS)}, got {conv_path!r}.")
    check_linear_path(linear_path)
    unet = unet_of(model)
    if any(isinstance(m, DEPLOYED_TYPES) for m in unet.modules()):
        raise ValueError("this UNet is already deployed; deploy a fresh fake-quant copy instead.")
    if config is not None:
        quantize_(unet, config, act_ranges)
    elif act_ranges is not None:
        raise ValueError("act_ranges are applied together with a config: pass config=... as well.")
    layers = quant_layers(unet)
    if not layers:
        raise ValueError("the UNet is not fake-quantized: pass a PrecisionConfig, or call mixdq.quantize_ first.")
    dtype = _unet_dtype(unet)
    kernel_backend = kernels.resolve_backend(next(unet.parameters()), backend)
    if kernel_backend == "triton" and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernels take float16/bfloat16 activations; cast the UNet first (it is {dtype}).")
    needs_bos = any(q.bos_aware and q.weight_bits is not None for q in layers.values())
    pipeline_bos = _pipeline_bos(model, unet) if needs_bos else None
    for layer in layers.values():
        check_deployable(layer, pipeline_bos)
    check_fp8_device(unet, layers.values(), kernel_backend)
    inventory = layer_inventory(unet)
    bits = PrecisionConfig(weight_bits={n: q.weight_bits for n, q in layers.items() if q.weight_bits is not None})
    other_params = non_layer_param_count(unet)
    fp16_bytes = weight_memory(inventory, None, other_params).total_bytes
    accounted_bytes = weight_memory(inventory, bits, other_params).total_bytes

    reports = []
    for info in inventory:
        layer = layers.pop(info.name)
        module = deploy_layer(layer, backend, pipeline_bos, conv_path, linear_path, fp8_fast_accum)
        unet.set_submodule(info.name, module)
        if isinstance(module, DEPLOYED_TYPES):
            precision = module.precision
            resolved = module.resolved_backend()
            layer_backend = "torch reference" if resolved == "torch" else resolved
        elif isinstance(module, QuantLayer):
            precision, layer_backend = f"W16A{module.act_bits}", "fake-quant"
        else:
            precision, layer_backend = "FP16", "torch"
        accounted = layer_weight_bytes(info, layer.weight_bits)
        reports.append(DeployedLayerReport(info.name, precision, layer_backend, _nbytes(module), accounted))
    return DeployReport(
        layers=tuple(reports),
        weight_bytes=_nbytes(unet),
        accounted_bytes=accounted_bytes,
        fp16_bytes=fp16_bytes,
        dtype=dtype,
        kernel_backend=kernel_backend,
    )
