"""The modules :func:`mixdq.deploy.deploy` puts in place of fake-quant layers: packed integer and FP8 layers.

See the package docstring (:mod:`mixdq.deploy`) for what each holds and how it computes.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

import kernels
from kernels import fp8
from mixdq.deploy.bos import BosAwareForward
from mixdq.deploy.policy import CONV_PATHS, DEFAULT_CONV_PATH, DeployOptions, linear_path_for
from mixdq.quant.layers import QuantLayer
from mixdq.quant.primitives import act_qparams, fp8_act_qparams, quantize_weight


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
        scale = layer.weight_scale(bits).float()  # (2, out) for a split shortcut: one row per input slice
        codes = quantize_weight(fp.weight.detach(), scale, bits, layer.concat_split)
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


class DeployedLinear(BosAwareForward, PackedLayer):
    """Packed replacement of a quantized ``nn.Linear`` (BOS-aware: see :class:`BosAwareForward`).

    ``linear_path`` (see :data:`LINEAR_PATHS`): ``"gemm"`` runs our integer GEMM (:func:`kernels.quant_linear`);
    ``"dequant"`` unpacks the weight to 16 bits per call and multiplies the A8-rounded input by it
    (:func:`kernels.linear_dequant`): the fake-quant numbers at cuBLAS's speed plus one unpacking kernel.
    """

    kind = "linear"
    # on the dequant path: this layer's dequantized weight, unpacked with the rest of its block during the
    # block's forward (:mod:`mixdq.deploy.unpack_groups`), else None: the layer unpacks its own
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

    @classmethod
    def from_quant_layer(cls, layer: QuantLayer, options: DeployOptions, extra_bos: torch.Tensor | None = None) -> Self:
        """The deployed layer on the path ``options.linear_path`` gives this layer's bits."""
        path = linear_path_for(options.linear_path, layer.weight_bits, layer.act_bits)
        return cls(layer, options.backend, extra_bos, path)

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

    @classmethod
    def from_quant_layer(cls, layer: QuantLayer, options: DeployOptions, extra_bos: torch.Tensor | None = None) -> Self:
        """The deployed layer, accumulating the fast way if ``options.fp8_fast_accum``."""
        module = cls(layer, options.backend, extra_bos)
        module.fast_accum = options.fp8_fast_accum
        return module

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
    fused along N by :mod:`mixdq.deploy.fuse` holds its parts' weight scales row by row, ``(N,)``).

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
    # (:mod:`mixdq.deploy.unpack_groups`), else None: the layer unpacks its own
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

    @classmethod
    def from_quant_layer(cls, layer: QuantLayer, options: DeployOptions, extra_bos: torch.Tensor | None = None) -> Self:
        """The deployed conv on ``options.conv_path`` (``extra_bos`` unused: convs are never BOS-aware)."""
        return cls(layer, options.backend, options.conv_path)

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


# the modules deploy() puts in place of fake-quant layers that quantize weights
DEPLOYED_TYPES = (PackedLayer, DeployedFP8Linear)  # DeployedFP8CodesLinear is a PackedLayer
