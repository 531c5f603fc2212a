"""MixDQ quantization simulation: fake-quant layers and the in-place ``quantize_`` verb.

Three layers, as in torchao / gpt-fast: pure tensor functions (:mod:`mixdq.quant.primitives`), the
module that holds scales and ranges (:mod:`mixdq.quant.layers`), and the transform (:mod:`mixdq.quant.api`).
"""

from mixdq.quant.api import (
    collect_act_ranges,
    dequantize_,
    quant_layers,
    quantization_off,
    quantize_,
    set_mode,
)
from mixdq.quant.layers import CalibrationRequiredError, QuantLayer, QuantMode

__all__ = [
    "CalibrationRequiredError",
    "QuantLayer",
    "QuantMode",
    "collect_act_ranges",
    "dequantize_",
    "quant_layers",
    "quantization_off",
    "quantize_",
    "set_mode",
]
