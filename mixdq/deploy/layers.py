"""``deploy``: turn a fake-quant UNet into real packed-integer layers that run on :mod:`kernels`.

Fake quantization (:mod:`mixdq.quant`) keeps every FP weight and only simulates rounding, so it saves no
memory and is slower than FP16. ``deploy`` makes the chosen precision real, in place:

* a layer with quantized weights becomes a :class:`DeployedLinear` / :class:`DeployedConv2d` holding the
  integer codes packed along K (int8, two int4 or four int2 per byte, :class:`kernels.PackedWeight`), one
  float32 scale and (for the A8 epilogue) one int32 row sum per output channel, the bias, and the static
  activation scale / zero-point of each input part. Its ``forward`` takes one of two paths, chosen per layer
  by what measured faster on an H200 (``linear_path`` / ``conv_path``): the integer GEMM
  (``kernels.quant_linear`` / ``kernels.conv2d_quant``: Triton on CUDA, the PyTorch integer reference
  elsewhere), by default for W8A8 linears; or the dequant path (:mod:`kernels.dequant`: the packed weight
  unpacked per call, a float matmul / conv on the A8-rounded input), by default for convs, packed int4 /
  int2 linears and weight-only linears;
* a W8A8 linear layer of the config's ``fp8`` list becomes a :class:`DeployedFP8Linear` (e4m3 codes, cuBLAS
  FP8 through ``torch._scaled_mm`` on GPUs of compute capability 8.9+); a W4A8 / W2A8 one a
  :class:`DeployedFP8CodesLinear` (packed integer codes unpacked to e4m3 per call, row-wise scaled cuBLAS FP8);
* a layer with FP weights but quantized activations (``W16A8``) stays a :class:`~mixdq.quant.QuantLayer`:
  there is no integer kernel for a float weight, and int8-activation x FP16-weight is exactly what the fake
  path computes (quantize, dequantize, FP16 matmul); it keeps its FP weights, as the accounting assumes;
* a layer with neither quantized goes back to the plain ``nn.Linear`` / ``nn.Conv2d``.

The codes are the ones the fake-quant layer uses (same scales, same :func:`~mixdq.quant.primitives.quantize_weight`)
and the kernels quantize activations with ``round(x * (1 / scale))`` like the fake path, so a deployed layer
matches its fake-quant layer up to float rounding of the accumulation and the kernels' 16-bit output.

BOS-aware cross-attention ``to_k`` / ``to_v`` (MixDQ): token 0 of the text embedding is the BOS hidden state,
the same for every prompt, and its K/V rows are computed in full precision. The fake layer computes them on
demand; a deployed layer cannot (its FP weights are gone), so ``deploy`` precomputes them before freeing:
for the token-0 vectors the fake layer already cached (calibration, earlier generations), the BOS state of the
pipeline's own text encoders (one encode of the empty prompt), and the all-zeros vector (the negative
embedding of ``force_zeros_for_empty_prompt`` under guidance). At run time token 0 is matched to the nearest
cached vector within :data:`BOS_MATCH_RTOL` (the same vector from another batch size or kernel may differ in
the last bits); a vector that matches none is an error, never a silent low-precision fallback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kernels
from kernels import fp8
from mixdq.config import PrecisionConfig
from mixdq.inventory import layer_inventory, non_layer_param_count
from mixdq.memory import MB, layer_weight_bytes, weight_memory
from mixdq.quant.api import quant_layers, quantize_, unet_of
from mixdq.quant.layers import CalibrationRequiredError, QuantLayer
from mixdq.quant.primitives import act_qparams, fp8_act_qparams, quantize_weight

# Relative L2 distance under which a run-time token-0 vector counts as a cached one. The same BOS state
# computed at another batch size or by another kernel differs by float rounding (< 1e-3 relative in FP16);
# BOS states of other text encoders or hidden layers (clip_skip) differ by O(1).
BOS_MATCH_RTOL = 1e-2


# how a deployed quantized conv computes: integer GEMM on patches, or float conv on the unpacked weight.
# The default is measured: on an H200 (1024 px SDXL UNet, W8A8, compiled) the dequant path's step took 20.90 ms
# against 23.27 ms with the int8 GEMM convs (bench/results/gpu_unet_h200_2026-11-28.md, calls 7 and 8); on
# the CPU the integer reference is the slower one too.
CONV_PATHS = ("gemm", "dequant")
DEFAULT_CONV_PATH = "dequant"

# how a deployed quantized linear computes: our Triton integer GEMM, or cuBLAS on the weight unpacked per call
# (kernels.linear_dequant): one path for every linear, or one per weight bit-width, e.g. {4: "dequant"}.
# "auto" (the default) is what measured faster on an H200 (1024 px SDXL UNet, compiled; bench/results/
# gpu_unet_h200_2026-11-28.md, session 5): the int8 GEMM for W8A8, the dequant path for packed int4 / int2
# weights and for weight-only layers, whose Triton GEMMs ran 2-4x slower than FP16 cuBLAS at the UNet's shapes.
LINEAR_PATHS = ("auto", "gemm", "dequant")
DEFAULT_LINEAR_PATH = "auto"


def auto_linear_path(weight_bits: int, act_bits: int | None) -> str:
    """``"gemm"`` for W8A8 linears, ``"dequant"`` otherwise (see :data:`LINEAR_PATHS`)."""
    return "gemm" if weight_bits == 8 and act_bits is not None else "dequant"


class BosCacheMissError(RuntimeError):
    """A deployed BOS-aware layer met a token-0 vector whose full-precision K/V it never precomputed."""


def check_linear_path(linear_path: str | Mapping[int, str]) -> None:
    """Raise ``ValueError`` unless ``linear_path`` is one of :data:`LINEAR_PATHS` or a {bits: path} mapping."""
    paths = linear_path.values() if isinstance(linear_path, Mapping) else [linear_path]
    bad = [p for p in paths if p not in LINEAR_PATHS]
    bad_bits = [b for b in linear_path if b not in (2, 4, 8)] if isinstance(linear_path, Mapping) else []
    if bad or bad_bits:
        raise ValueError(
            f"linear_path must be one of {list(LINEAR_PATHS)} or a mapping of weight bits (2, 4, 8) to one; "
            f"got {linear_path!r}."
        )


def linear_path_for(linear_path: str | Mapping[int, str], weight_bits: int, act_bits: int | None) -> str:
    """``"gemm"`` or ``"dequant"`` for one layer: a mapping without its bit-width, or "auto", means the rule."""
    path = linear_path.get(weight_bits, "auto") if isinstance(linear_path, Mapping) else linear_path
    return auto_linear_path(weight_bits, act_bits) if path == "auto" else path


def _nbytes(module: nn.Module) -> int:
    """Exact bytes of every parameter and buffer a module holds."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class PackedLayer(nn.Module):
    """What :class:`DeployedLinear` and :class:`DeployedConv2d` share: packed codes, scales, act params.

    Not an ``nn.Linear`` / ``nn.Conv2d`` subclass on purpose: code that looks for those (the layer inventory,
    ``quantize_``) must not mistake a packed layer for a float one. ``out_features``, ``in_features`` (per
    output row: ``in_channels * kh * kw`` for a conv), ``weight_shape`` and ``kind`` describe the original layer.
    Tensors are buffers, so ``.to(device)`` moves them and ``state_dict`` holds them; the activation
    parameters are Python numbers because the kernels take them as launch arguments (no device sync).
    """

    kind: str

    def __init__(self, layer: QuantLayer, backend: str) -> None:
        super().__init__()
        fp = layer.fp_module
        bits = layer.weight_bits
        scale = layer.weight_scale(bits).float()
        codes = quantize_weight(fp.weight.detach(), scale, bits)
        if codes.dim() == 4:
            codes = kernels.conv_weight_matrix(codes)
        packed = kernels.PackedWeight.from_codes(codes, scale, bits, k_split=layer.concat_split)
        self.register_buffer("qweight", packed.data)
        self.register_buffer("weight_scale", packed.scale)
        self.register_buffer("weight_rowsum", packed.rowsum)
        self.register_buffer("bias", None if fp.bias is None else fp.bias.detach().clone())
        self.layer_name = layer.layer_name
        self.weight_bits = bits
        self.act_bits = layer.act_bits
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.k_split = layer.concat_split
        self.weight_shape = tuple(fp.weight.shape)
        self.backend = backend
        self.act_kwargs = self._static_act_kwargs(layer)
        # the same quantizers as a float32 tensor [3, parts] of rows (1 / s, zp, s), read by torch.compile'd
        # graphs and the dequantizing paths (see _act_params); held as its int32 bit pattern so that
        # module.half() / .to(dtype) cannot round it
        act_params = None
        if self.act_kwargs:
            act_params = kernels.reference.act_params_tensor(
                packed, self.act_kwargs["act_scale"], self.act_kwargs["act_zp"], packed.data.device
            ).view(torch.int32)
        self.register_buffer("act_qparams_t", act_params)

    @staticmethod
    def _static_act_kwargs(layer: QuantLayer) -> dict[str, Any]:
        """``act_scale`` / ``act_zp`` / ``act_bits`` for the kernels (empty for weight-only layers)."""
        bits = layer.act_bits
        if bits is None:
            return {}
        scales, zero_points = act_qparams(layer.act_range(bits), bits)
        scale = tuple(float(s) for s in scales)
        zero_point = tuple(int(z) for z in zero_points)
        if len(scale) == 1:
            return {"act_scale": scale[0], "act_zp": zero_point[0], "act_bits": bits}
        return {"act_scale": scale, "act_zp": zero_point, "act_bits": bits}

    def _compiled_act_params(self) -> torch.Tensor | None:
        """The float32 ``[3, P]`` quantizers under torch.compile, else None (eager: Python numbers suffice).

        Inductor bakes Python numbers into the kernels it generates and Dynamo guards on them, so with numbers
        every layer's quantizer was a kernel of its own to compile, and every copy of a repeated block its own
        graph; as tensors, layers and blocks of the same shapes share compiled code.
        """
        if self.act_qparams_t is None or not torch.compiler.is_compiling():
            return None
        return self._act_params()

    def _act_params(self) -> torch.Tensor | None:
        """Float32 ``[3, P]``: rows ``(1 / s, zp, s)``, one column per input part (None for weight-only layers)."""
        return None if self.act_qparams_t is None else self.act_qparams_t.view(torch.float32)

    def _act_param_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(1 / s, zp, s)`` float32 tensors, one element per input part (None for weight-only layers)."""
        params = self._act_params()
        return None if params is None else tuple(params.unbind())

    @property
    def packed_weight(self) -> kernels.PackedWeight:
        return kernels.PackedWeight(
            self.qweight, self.weight_scale, self.weight_rowsum, self.weight_bits, self.in_features, self.k_split
        )

    @property
    def precision(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits or 16}"

    def resolved_backend(self) -> str:
        """``"triton"`` or ``"torch"``: what the kernels dispatch to for this layer's device now."""
        return kernels.resolve_backend(self.qweight, self.backend)

    def extra_repr(self) -> str:
        extras = [f"{self.precision}", f"out={self.out_features}", f"in={self.in_features}", f"backend={self.backend}"]
        if self.k_split is not None:
            extras.append(f"k_split={self.k_split}")
        return ", ".join(extras)


def _bos_vectors(layer: QuantLayer, extra_bos: torch.Tensor | None) -> torch.Tensor:
    """``(K, C_in)`` token-0 vectors to precompute: zeros, those the fake layer cached, and ``extra_bos``."""
    weight = layer.fp_module.weight
    rows = [torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)]
    for known in (layer._bos_inputs, extra_bos):
        if known is not None:
            rows.append(known.detach().to(weight.device, weight.dtype))
    return torch.cat(rows)


class BosAwareForward:
    """The forward of a deployed linear layer, BOS-aware for cross-attention ``to_k`` / ``to_v``.

    ``bos_inputs`` ``(K, C_in)`` / ``bos_outputs`` ``(K, C_out)`` (model dtype, BOS-aware layers only): the
    token-0 vectors this layer knows and their full-precision outputs, precomputed by :func:`deploy`; every
    other row goes through the subclass's ``_matmul``.
    """

    layer_name: str

    def _register_bos(self, layer: QuantLayer, extra_bos: torch.Tensor | None) -> None:
        if not layer.bos_aware:
            self.register_buffer("bos_inputs", None)
            self.register_buffer("bos_outputs", None)
            return
        keys = torch.unique(_bos_vectors(layer, extra_bos), dim=0)
        self.register_buffer("bos_inputs", keys)
        self.register_buffer("bos_outputs", layer.fp_module(keys).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_inputs is None:
            return self._matmul(x)
        return torch.cat([self._bos_rows(x[:, 0]).unsqueeze(1), self._matmul(x[:, 1:])], dim=1)

    def _bos_rows(self, token0: torch.Tensor) -> torch.Tensor:
        """Full-precision outputs ``(B, C_out)`` for token-0 inputs ``(B, C_in)``, from the precomputed cache."""
        # squared distances as plain elementwise ops + a reduction, which Inductor fuses into one small kernel
        # (cdist + norm + their launches cost ~0.9 ms per SDXL step over the 140 layers on an H200)
        keys = self.bos_inputs.float()
        distance2, index = (token0.float()[:, None, :] - keys[None]).square().sum(-1).min(dim=1)
        hit = distance2 <= BOS_MATCH_RTOL**2 * keys.square().sum(-1)[index]
        if token0.is_cuda or torch.compiler.is_compiling():
            # a device-side check: a host sync here would break CUDA-graph capture and torch.compile graphs
            # torch caps the message at 255 characters; compiled, it names no layer: Dynamo would guard on the
            # name, and every copy of a repeated block would compile on its own (run eagerly to see which layer)
            where = "a deployed BOS-aware layer" if torch.compiler.is_compiling() else self.layer_name
            torch._assert_async(hit.all(), f"BOS cache miss in {where}"[:250])
        elif not bool(hit.all()):
            raise BosCacheMissError(self._miss_message())
        return self.bos_outputs[index].to(token0.dtype)

    def _miss_message(self) -> str:
        return (
            f"{self.layer_name}: token 0 of the text embedding is none of the {len(self.bos_inputs)} vectors whose "
            "full-precision K/V were precomputed at deploy time (the text encoders' BOS state, the all-zeros "
            "negative embedding, and the vectors seen before deploy), and the FP weights needed to compute it "
            "were freed. Deploy with the pipeline whose text encoders make the embeddings (mixdq.deploy(pipe)), "
            "or run one generation with the same embedding settings (e.g. clip_skip, custom prompt_embeds) on "
            "the fake-quant model before deploying."
        )


class DeployedLinear(BosAwareForward, PackedLayer):
    """Packed replacement of a quantized ``nn.Linear`` (BOS-aware: see :class:`BosAwareForward`).

    ``linear_path`` (see :data:`LINEAR_PATHS`): ``"gemm"`` runs our integer GEMM (:func:`kernels.quant_linear`);
    ``"dequant"`` unpacks the weight to 16 bits per call and multiplies the A8-rounded input by it
    (:func:`kernels.linear_dequant`): the fake-quant numbers at cuBLAS's speed plus one unpacking kernel.
    """

    kind = "linear"
    # on the dequant path: this layer's dequantized weight, unpacked with the rest of its block during the
    # block's forward (:mod:`mixdq.unpack_groups`), else None: the layer unpacks its own
    prefetched_weight: torch.Tensor | None = None

    def __init__(
        self,
        layer: QuantLayer,
        backend: str,
        extra_bos: torch.Tensor | None = None,
        linear_path: str = "gemm",
    ) -> None:
        super().__init__(layer, backend)
        if linear_path not in ("gemm", "dequant"):
            raise ValueError(f"linear_path must be 'gemm' or 'dequant', got {linear_path!r}.")
        self.linear_path = linear_path
        self._register_bos(layer, extra_bos)

    def resolved_backend(self) -> str:
        """``"dequant + matmul"`` on the dequant path, else where the integer GEMM runs (see PackedLayer)."""
        return "dequant + matmul" if self.linear_path == "dequant" else super().resolved_backend()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_path == "dequant":
            return kernels.linear_dequant(
                x,
                self.packed_weight,
                self.bias,
                act_qparams=self._act_param_tensors(),
                act_bits=self.act_bits or 8,
                backend=self.backend,
                dequantized=self.prefetched_weight,
            )
        params = self._compiled_act_params()
        if params is not None:  # compiled: quantize here with tensor parameters; the GEMM gets int8 codes
            codes = kernels.reference.quantize_act_parts_tensors(x, params[0], params[1], self.k_split, self.act_bits)
            return kernels.quant_linear_codes(
                codes, self.packed_weight, params, self.bias, backend=self.backend, out_dtype=x.dtype
            )
        y = kernels.quant_linear(
            x, self.packed_weight, bias=self.bias, backend=self.backend, out_dtype=x.dtype, **self.act_kwargs
        )
        return y.to(x.dtype)


class FP8Matmul:
    """What the two FP8 linears share: when cuBLAS FP8 runs, float32 scales, fast accumulation.

    The ``SCALES`` buffers stay float32 through ``.half()`` / ``.to(dtype)``: cuBLAS FP8 takes float32 scales,
    and rounding them would change every output. Each is its own tensor: Inductor's CUDA lowering of
    ``_scaled_mm`` reshapes its scale arguments and failed (torch 2.11, H200) on bit-cast views of one buffer.
    ``out_scale = weight_scale * act_scale`` is precomputed: the row-wise recipe's ``scale_b``
    (:func:`kernels.fp8.fp8_linear`). ``fast_accum``: cuBLAS's fast accumulation (``deploy(fp8_fast_accum=)``).
    """

    SCALES = ("weight_scale", "act_scale", "act_inv_scale", "out_scale")
    backend: str
    in_features: int
    out_features: int
    fast_accum: bool = False

    def _register_act_scales(self, act_range: torch.Tensor) -> None:
        """``act_scale`` / ``act_inv_scale`` (0-d, e4m3's per-tensor activation scale) and ``out_scale``."""
        act_scale, act_inv_scale = fp8_act_qparams(act_range)
        self.register_buffer("act_scale", act_scale[0].detach().to(torch.float32).clone())
        self.register_buffer("act_inv_scale", act_inv_scale[0].detach().to(torch.float32).clone())
        self.register_buffer("out_scale", self.weight_scale * self.act_scale)
        self._make_ones_column()

    def _make_ones_column(self) -> None:
        if self.qweight.is_cuda:  # the cached column of the row-wise recipe, made outside any compiled graph
            fp8.ones_column(0, self.qweight.device)

    def _cublas_name(self, name: str) -> str:
        """``name`` (the cuBLAS path) marked when it accumulates the fast way, as the deploy report shows it."""
        return f"{name} (fast accumulation)" if self.fast_accum else name

    def _fp8_linear(self, x: torch.Tensor, codes: torch.Tensor, use_scaled_mm: bool) -> torch.Tensor:
        return fp8.fp8_linear(
            x,
            codes,
            self.weight_scale,
            self.act_inv_scale,
            self.act_scale,
            self.bias,
            use_scaled_mm=use_scaled_mm,
            out_scale=self.out_scale,
            fast_accum=self.fast_accum,
        )

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        """cuBLAS FP8 (``torch._scaled_mm``) for x's device and this layer's shape, else the reference path."""
        return kernels.resolve_backend(x, self.backend) == "triton" and fp8.fp8_shape_ok(
            self.in_features, self.out_features
        )

    def _apply(self, fn, recurse: bool = True):
        scales = {name: self._buffers.pop(name) for name in self.SCALES}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, scale in scales.items():
                self.register_buffer(name, scale.to(self.qweight.device))
        self._make_ones_column()
        return self


class DeployedFP8Linear(FP8Matmul, BosAwareForward, nn.Module):
    """A W8A8 ``nn.Linear`` of a config's ``fp8`` list: e4m3 weight and activations, one scale each (a layer
    fused along N by :mod:`mixdq.fuse` holds its parts' weight scales row by row, ``(N,)``).

    On a CUDA GPU with FP8 tensor cores the product is one cuBLAS call (``torch._scaled_mm``, bias and FP16
    output fused); elsewhere, and for shapes cuBLAS FP8 rejects, the same codes are dequantized and multiplied
    (:func:`kernels.fp8.fp8_linear`). The codes are held as uint8, so ``module.half()`` cannot convert them;
    its scales are float32 0-d buffers (:class:`FP8Matmul`).
    """

    kind = "linear"
    weight_bits = 8
    act_bits = 8
    k_split = None

    def __init__(self, layer: QuantLayer, backend: str, extra_bos: torch.Tensor | None = None) -> None:
        super().__init__()
        fp = layer.fp_module
        codes, weight_scale = fp8.quantize_fp8_weight(fp.weight)
        self.register_buffer("qweight", codes.view(torch.uint8))
        self.register_buffer("weight_scale", weight_scale.detach().to(torch.float32).clone())
        self._register_act_scales(layer.act_range(8))
        self.register_buffer("bias", None if fp.bias is None else fp.bias.detach().clone())
        self.layer_name = layer.layer_name
        self.out_features, self.in_features = fp.weight.shape
        self.weight_shape = tuple(fp.weight.shape)
        self.backend = backend
        self._register_bos(layer, extra_bos)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp8_linear(x, self.qweight.view(fp8.FP8_DTYPE), self._use_scaled_mm(x))

    @property
    def precision(self) -> str:
        return "W8A8 FP8"

    def resolved_backend(self) -> str:
        """``"cuBLAS FP8"`` where ``torch._scaled_mm`` runs for this layer on its device now, else ``"torch"``."""
        return self._cublas_name("cuBLAS FP8") if self._use_scaled_mm(self.qweight) else "torch"

    def extra_repr(self) -> str:
        return f"{self.precision}, out={self.out_features}, in={self.in_features}, backend={self.backend}"


class DeployedFP8CodesLinear(FP8Matmul, BosAwareForward, PackedLayer):
    """A W4A8 / W2A8 ``nn.Linear`` of a config's ``fp8`` list: its packed integer weight, e4m3 activations.

    The weight stays on its own grid (per-channel scales, codes packed two or four per byte, as in
    :class:`DeployedLinear`); per call the codes are unpacked to e4m3, which holds every 4- and 2-bit code
    exactly, and multiplied on FP8 tensor cores with row-wise scales (:func:`kernels.fp8.fp8_linear`):
    half the bytes an FP16 unpacking writes, and cuBLAS FP8's speed. Only the activations change grid, to e4m3
    with one scale, as in :class:`DeployedFP8Linear`. On a CPU, or for shapes cuBLAS FP8 rejects, the same
    codes are dequantized and multiplied.
    """

    kind = "linear"
    # this layer's e4m3 codes, unpacked with the rest of its block during the block's forward
    # (:mod:`mixdq.unpack_groups`), else None: the layer unpacks its own
    prefetched_weight: torch.Tensor | None = None

    def __init__(self, layer: QuantLayer, backend: str, extra_bos: torch.Tensor | None = None) -> None:
        super().__init__(layer, backend)
        self._register_act_scales(layer.act_range(8))
        self._register_bos(layer, extra_bos)

    @staticmethod
    def _static_act_kwargs(layer: QuantLayer) -> dict[str, Any]:
        return {}  # no int8 quantizer: the activations are e4m3 (act_scale / act_inv_scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        use_scaled_mm = self._use_scaled_mm(x)
        codes = self.prefetched_weight
        if codes is None:
            codes = self.packed_weight.codes_fp8("triton" if use_scaled_mm else "torch")
        return self._fp8_linear(x, codes, use_scaled_mm)

    @property
    def precision(self) -> str:
        return f"W{self.weight_bits}A8 FP8"

    def resolved_backend(self) -> str:
        """``"unpack + cuBLAS FP8"`` where ``torch._scaled_mm`` runs for this layer on its device now, else
        ``"torch"``."""
        return self._cublas_name("unpack + cuBLAS FP8") if self._use_scaled_mm(self.qweight) else "torch"


class DeployedConv2d(PackedLayer):
    """Packed replacement of a quantized ``nn.Conv2d`` (weight in channels-last ``(kh, kw, C)`` order).

    ``conv_path`` (see :data:`CONV_PATHS`): ``"gemm"`` runs the integer GEMM on channels-last patches
    (:func:`kernels.conv2d_quant`); ``"dequant"`` unpacks the weight to 16 bits per call and runs a float conv
    on the A8-rounded input (:func:`kernels.conv2d_dequant`): the same numbers, cuDNN's speed.
    """

    kind = "conv"

    def __init__(self, layer: QuantLayer, backend: str, conv_path: str = DEFAULT_CONV_PATH) -> None:
        super().__init__(layer, backend)
        if conv_path not in CONV_PATHS:
            raise ValueError(f"conv_path must be one of {list(CONV_PATHS)}, got {conv_path!r}.")
        self.conv_path = conv_path
        conv = layer.fp_module
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding

    def resolved_backend(self) -> str:
        """``"dequant + conv"`` on the dequant path, else where the integer GEMM runs (see PackedLayer)."""
        return "dequant + conv" if self.conv_path == "dequant" else super().resolved_backend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_path == "dequant":
            return kernels.conv2d_dequant(
                x,
                self.packed_weight,
                self.kernel_size,
                self.stride,
                self.padding,
                self.bias,
                act_qparams=self._act_param_tensors(),
                act_bits=self.act_bits or 8,
                backend=self.backend,
            )
        y = kernels.conv2d_quant(
            x,
            self.packed_weight,
            self.kernel_size,
            self.stride,
            self.padding,
            bias=self.bias,
            backend=self.backend,
            act_params=self._compiled_act_params(),
            **self.act_kwargs,
        )
        return y.to(x.dtype)


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


def deploy_layer(
    layer: QuantLayer,
    backend: str = "auto",
    extra_bos: torch.Tensor | None = None,
    conv_path: str = DEFAULT_CONV_PATH,
    linear_path: str | Mapping[int, str] = DEFAULT_LINEAR_PATH,
    fp8_fast_accum: bool = False,
) -> nn.Module:
    """The module that replaces one fake-quant layer (see the module docstring for the three cases).

    A BOS-aware layer precomputes the full-precision output of the all-zeros vector, of the token-0 vectors
    the fake layer cached, and of ``extra_bos`` ``(K, C_in)`` (the pipeline's BOS state).
    """
    check_deployable(layer, extra_bos)
    if layer.weight_bits is None:
        return layer if layer.act_bits is not None else layer.fp_module
    if isinstance(layer.fp_module, nn.Conv2d):
        return DeployedConv2d(layer, backend, conv_path)
    if layer.fp8:
        kind = DeployedFP8Linear if layer.weight_bits == 8 else DeployedFP8CodesLinear
        module = kind(layer, backend, extra_bos)
        module.fast_accum = fp8_fast_accum
        return module
    path = linear_path_for(linear_path, layer.weight_bits, layer.act_bits)
    return DeployedLinear(layer, backend, extra_bos, path)


# the modules deploy() puts in place of fake-quant layers that quantize weights
DEPLOYED_TYPES = (PackedLayer, DeployedFP8Linear)  # DeployedFP8CodesLinear is a PackedLayer


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
    what the kernels keep beyond ``ceil(K * bits / 8)`` packed bytes + one FP16 scale + FP16 bias per row:
    float32 scales (+2 B per row), int32 row sums for the A8 zero-point correction (+4 B per row and input
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


def _check_fp8_device(unet: nn.Module, layers, kernel_backend: str) -> None:
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
    measured faster, see :data:`DEFAULT_CONV_PATH`) or ``"gemm"`` (the integer GEMM on patches).
    ``linear_path``: how integer linears compute (:class:`DeployedLinear`): ``"auto"`` (default: the
    measured faster path per layer kind), ``"gemm"`` or ``"dequant"``, or a mapping from weight bits to one of
    them (see :data:`LINEAR_PATHS`). ``fp8_fast_accum``: FP8 layers multiply with cuBLAS's fast
    accumulation (measured faster on an H200; each GEMM's error ~3e-3 relative instead of ~4e-4, which the
    fake-quant model does not simulate: off by default).
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
    _check_fp8_device(unet, layers.values(), kernel_backend)
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
