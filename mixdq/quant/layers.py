"""The fake-quant layer that replaces each ``nn.Linear`` / ``nn.Conv2d`` of the UNet.

It keeps the original layer as ``fp_module`` (the layer inventory looks through it), the weight scales of
every candidate bit, and one calibrated activation range per candidate activation bit. Quantization is
simulated in floating point: the matmul/conv runs on fake-quantized weights and inputs, which is exactly
what an integer kernel with the same scales computes, up to float rounding of the accumulation.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from mixdq.config import ACT_BITS, WEIGHT_BITS, WEIGHT_CLIPS
from mixdq.quant.primitives import (
    act_qparams,
    fake_quantize_act_fp8,
    fake_quantize_act_qparams,
    fake_quantize_weight,
    fake_quantize_weight_fp8,
    fp8_act_qparams,
    observe_min_max,
    weight_scales,
    weight_scales_mse,
)


class CalibrationRequiredError(RuntimeError):
    """Activation quantization was asked for a layer/bit-width that has no calibrated range."""

    def __init__(self, layer_name: str, bits: int) -> None:
        super().__init__(
            f"layer {layer_name!r} has no calibrated range for {bits}-bit activations; run "
            "mixdq.calibrate.calibrate(pipe) first and pass its result to quantize_(unet, config, act_ranges=...)."
        )


class QuantMode(str, Enum):
    """What a :class:`QuantLayer` does in ``forward``."""

    FP = "fp"  # the original layer, bit-exact, whatever the bits say
    CALIBRATE = "calibrate"  # update the activation range from this input, then quantize with it
    QUANTIZED = "quantized"  # quantize with the stored range (static activation quantization)


class QuantLayer(nn.Module):
    """Fake-quant wrapper of one ``nn.Linear`` or ``nn.Conv2d``.

    ``weight_bits`` / ``act_bits`` of ``None`` keep that side in floating point; with both ``None`` the
    output is the original layer's, bit for bit. Setting ``weight_bits`` is cheap and safe to do thousands
    of times (sensitivity sweeps): the fake-quantized weight is computed lazily once per change, always from
    the scales of the bit that is set.

    ``concat_split = c`` quantizes input channels ``[:c]`` and ``[c:]`` with separate activation ranges and
    separate weight scales (up-block ``conv_shortcut`` inputs are ``cat([upsampled, skip])``, whose ranges
    differ a lot, and so do the weight columns that read them): MixDQ's two act and two weight quantizers.
    Its weight scales are ``(2, out)``, one row per input slice.
    ``weight_clip`` (set by ``quantize_`` from the config): ``"minmax"`` (MixDQ) or ``"mse"``, per-row scales
    with the least squared rounding error (:func:`~mixdq.quant.primitives.weight_scales_mse`), computed on
    first use per bit-width and cached.

    ``fp8`` (set by ``quantize_`` for the layers of a config's ``fp8`` list): the side(s) at 8 bits use the
    FP8 e4m3 grid of :mod:`kernels.fp8` (one scale per tensor) instead of int8, as a deployed FP8 layer does.

    ``bos_aware`` (cross-attention ``to_k`` / ``to_v``): token 0 of the ``(B, T, C)`` text embedding is left
    out of calibration and quantization; its output row is the full-precision one, computed once per
    distinct token-0 vector and cached, since the BOS hidden state is the same for every prompt.
    """

    def __init__(
        self,
        fp_module: nn.Linear | nn.Conv2d,
        layer_name: str = "",
        concat_split: int | None = None,
        bos_aware: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(fp_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"QuantLayer wraps nn.Linear or nn.Conv2d, got {type(fp_module).__name__}.")
        self.fp_module = fp_module
        self.layer_name = layer_name
        self.concat_split = concat_split
        self.bos_aware = bos_aware
        self.mode = QuantMode.QUANTIZED
        self._weight_bits: int | None = None
        self._act_bits: int | None = None
        self._fp8 = False
        self._weight_clip = "minmax"
        self._mse_scales: dict[int, torch.Tensor] = {}
        for bits, scale in weight_scales(fp_module.weight, split=concat_split).items():
            self.register_buffer(f"weight_scale_{bits}", scale, persistent=False)
        for bits in ACT_BITS:
            self.register_buffer(f"act_range_{bits}", None, persistent=False)
        self.register_buffer("_fq_weight", None, persistent=False)
        # (num_parts,) scale / zero point of the current act bits, refreshed whenever bits or range change
        self.register_buffer("_act_scale", None, persistent=False)
        self.register_buffer("_act_zero_point", None, persistent=False)
        self.register_buffer("_bos_inputs", None, persistent=False)
        self.register_buffer("_bos_outputs", None, persistent=False)

    def __getattr__(self, name: str):
        """Attributes of the wrapped layer (``in_features``, ``weight``, ``kernel_size`` ...) read through, so
        code that inspects layers (diffusers does, e.g. ``add_embedding.linear_1.in_features``) keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "fp_module" not in modules:
                raise
            return getattr(modules["fp_module"], name)

    # ---- bits and ranges --------------------------------------------------------------------------
    @property
    def weight_bits(self) -> int | None:
        return self._weight_bits

    @weight_bits.setter
    def weight_bits(self, bits: int | None) -> None:
        self._check_bits(bits, WEIGHT_BITS, "weight")
        if bits != self._weight_bits:
            self._fq_weight = None
        self._weight_bits = bits

    @property
    def act_bits(self) -> int | None:
        return self._act_bits

    @act_bits.setter
    def act_bits(self, bits: int | None) -> None:
        self._check_bits(bits, ACT_BITS, "activation")
        self._act_bits = bits
        self._refresh_act_qparams()

    @property
    def weight_clip(self) -> str:
        return self._weight_clip

    @weight_clip.setter
    def weight_clip(self, clip: str) -> None:
        if clip not in WEIGHT_CLIPS:
            raise ValueError(f"{self.layer_name}: weight_clip {clip!r} not allowed; choose from {list(WEIGHT_CLIPS)}.")
        if clip != self._weight_clip:
            self._fq_weight = None
        self._weight_clip = clip

    def weight_scale(self, bits: int) -> torch.Tensor:
        """The float32 scales of ``bits``-bit weights under this layer's ``weight_clip``: ``(out,)``, or
        ``(2, out)`` (one row per input slice) with a ``concat_split``."""
        if self._weight_clip == "minmax":
            return getattr(self, f"weight_scale_{bits}")
        weight = self.fp_module.weight
        if bits not in self._mse_scales:
            self._mse_scales[bits] = weight_scales_mse(weight, bits, split=self.concat_split)
        return self._mse_scales[bits].to(weight.device)  # a plain cache: .to(device) does not move it

    @property
    def fp8(self) -> bool:
        return self._fp8

    @fp8.setter
    def fp8(self, value: bool) -> None:
        if bool(value) != self._fp8:
            self._fq_weight = None
        self._fp8 = bool(value)
        self._refresh_act_qparams()

    def _fp8_side(self, bits: int | None) -> bool:
        """FP8 replaces int8 on a side only at 8 bits (a sweep may set other bits on an FP8 layer)."""
        return self._fp8 and bits == 8

    def set_bits(self, weight_bits: int | None, act_bits: int | None) -> None:
        """Set both bit-widths (``None`` = floating point); activation bits need a calibrated range.

        Checks both before changing either, so a rejected call leaves the layer as it was.
        """
        self._check_bits(weight_bits, WEIGHT_BITS, "weight")
        self._check_bits(act_bits, ACT_BITS, "activation")
        if act_bits is not None and self.act_range(act_bits) is None:
            raise CalibrationRequiredError(self.layer_name, act_bits)
        self.weight_bits = weight_bits
        self.act_bits = act_bits

    def _check_bits(self, bits: int | None, allowed: tuple[int, ...], what: str) -> None:
        if bits is not None and bits not in allowed:
            raise ValueError(
                f"{self.layer_name}: {what} bits {bits!r} not allowed; choose from {list(allowed)} or None."
            )

    @property
    def num_parts(self) -> int:
        """Number of separately quantized input parts (2 for a concat-split input, else 1)."""
        return 1 if self.concat_split is None else 2

    def act_range(self, bits: int) -> torch.Tensor | None:
        """The calibrated input range at ``bits``: float32 ``(num_parts, 2)`` rows of ``(min, max)``."""
        return getattr(self, f"act_range_{bits}")

    def set_act_range(self, bits: int, act_range: torch.Tensor | None) -> None:
        """Load (or, with ``None``, clear) the calibrated input range at ``bits``."""
        if bits not in ACT_BITS:
            raise ValueError(f"{self.layer_name}: activation bits {bits!r} not allowed; choose from {list(ACT_BITS)}.")
        if act_range is not None:
            if tuple(act_range.shape) != (self.num_parts, 2):
                raise ValueError(
                    f"{self.layer_name}: activation range of shape {tuple(act_range.shape)}, "
                    f"expected ({self.num_parts}, 2) (one (min, max) row per input part)."
                )
            act_range = act_range.detach().to(device=self.fp_module.weight.device, dtype=torch.float32)
        setattr(self, f"act_range_{bits}", act_range)
        if bits == self._act_bits:
            self._refresh_act_qparams()

    def _refresh_act_qparams(self) -> None:
        act_range = None if self._act_bits is None else self.act_range(self._act_bits)
        if act_range is None:
            self._act_scale = self._act_zero_point = None
        elif self._fp8_side(self._act_bits):  # (scale, 1 / scale) per part
            self._act_scale, self._act_zero_point = fp8_act_qparams(act_range)
        else:
            self._act_scale, self._act_zero_point = act_qparams(act_range, self._act_bits)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FP or (self._weight_bits is None and self._act_bits is None):
            return self.fp_module(x)
        if self.bos_aware:
            return torch.cat([self._bos_output(x[:, :1]), self._quantized_forward(x[:, 1:])], dim=1)
        return self._quantized_forward(x)

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._act_bits is not None:
            x = self._quantize_input(x)
        weight = self.fp_module.weight if self._weight_bits is None else self._fake_quant_weight()
        if isinstance(self.fp_module, nn.Linear):
            return F.linear(x, weight, self.fp_module.bias)
        return self.fp_module._conv_forward(x, weight, self.fp_module.bias)

    def _fake_quant_weight(self) -> torch.Tensor:
        if self._fq_weight is None:
            weight = self.fp_module.weight.detach()
            if self._fp8_side(self._weight_bits):
                self._fq_weight = fake_quantize_weight_fp8(weight)
            else:
                scale = self.weight_scale(self._weight_bits)
                self._fq_weight = fake_quantize_weight(weight, scale, self._weight_bits, self.concat_split)
        return self._fq_weight

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        bits = self._act_bits
        parts = (x,) if self.concat_split is None else x.split([self.concat_split, x.shape[1] - self.concat_split], 1)
        if self.mode is QuantMode.CALIBRATE:
            previous = self.act_range(bits)
            observed = [observe_min_max(p, None if previous is None else previous[i]) for i, p in enumerate(parts)]
            self.set_act_range(bits, torch.stack(observed))
        if self._act_scale is None:
            raise CalibrationRequiredError(self.layer_name, bits)
        # int8: (scale, zero point) per part; FP8: (scale, 1 / scale) per part
        if self._fp8_side(bits):
            quantized = [
                fake_quantize_act_fp8(p, s, inv) for p, s, inv in zip(parts, self._act_scale, self._act_zero_point)
            ]
        else:
            pairs = zip(parts, self._act_scale, self._act_zero_point)
            quantized = [fake_quantize_act_qparams(p, s, z, bits) for p, s, z in pairs]
        return quantized[0] if len(quantized) == 1 else torch.cat(quantized, dim=1)

    def _bos_output(self, token0: torch.Tensor) -> torch.Tensor:
        """Full-precision output ``(B, 1, C_out)`` for token-0 inputs ``(B, 1, C)``, from the cache."""
        rows = token0[:, 0]
        if self._bos_inputs is None or not bool(self._bos_matches(rows).any(1).all()):
            self._cache_bos(rows)
        return self._bos_outputs[self._bos_matches(rows).int().argmax(1)].unsqueeze(1)

    def _bos_matches(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` bool: row ``b`` is exactly (``torch.equal``) cache entry ``k``."""
        return (rows[:, None, :] == self._bos_inputs[None]).all(-1)

    def _cache_bos(self, rows: torch.Tensor) -> None:
        for row in rows:
            if self._bos_inputs is not None and any(torch.equal(row, key) for key in self._bos_inputs):
                continue
            output = self.fp_module(row.view(1, 1, -1)).view(1, -1).detach()
            key = row.detach().view(1, -1)
            self._bos_inputs = key if self._bos_inputs is None else torch.cat([self._bos_inputs, key])
            self._bos_outputs = output if self._bos_outputs is None else torch.cat([self._bos_outputs, output])

    def extra_repr(self) -> str:
        extras = [f"weight_bits={self._weight_bits}", f"act_bits={self._act_bits}", f"mode={self.mode.value}"]
        if self._fp8:
            extras.append("fp8=True")
        if self._weight_clip != "minmax":
            extras.append(f"weight_clip={self._weight_clip}")
        if self.concat_split is not None:
            extras.append(f"concat_split={self.concat_split}")
        if self.bos_aware:
            extras.append("bos_aware=True")
        return ", ".join(extras)
