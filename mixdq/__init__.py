"""MixDQ Studio: mixed-precision post-training quantization for few-step SDXL-style diffusion models."""

__version__ = "0.1.0"

from mixdq.config import PrecisionConfig
from mixdq.deploy import DeployReport, deploy
from mixdq.deploy.checkpoint import load_quantized, save_quantized
from mixdq.quant import dequantize_, quantize_

__all__ = ["DeployReport", "PrecisionConfig", "deploy", "dequantize_", "load_quantized", "quantize_", "save_quantized"]
