"""MixDQ Studio: mixed-precision post-training quantization for few-step SDXL-style diffusion models."""

__version__ = "0.1.0"
