"""MixDQ Studio: mixed-precision post-training quantization for few-step SDXL-style diffusion models."""

from mixdq.config import PrecisionConfig
from mixdq.deploy import DeployReport, deploy
from mixdq.deploy.checkpoint import load_quantized, save_quantized
from mixdq.quant import dequantize_, quantize_
from mixdq.version import __version__

__all__ = [
    "DeployReport",
    "PrecisionConfig",
    "__version__",
    "deploy",
    "dequantize_",
    "load_quantized",
    "quantize_",
    "save_quantized",
]
