"""End to end: calibrated fake-quant UNet in the SDXL pipeline, image PSNR vs FP at W8A8 / W4A8 / W2A8."""

import copy

import pytest
import torch

from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.inventory import layer_inventory
from mixdq.quant import quantize_

CALIBRATION_PROMPTS = [
    "a red circle above a blue square on a yellow background",
    "a green triangle left of a purple circle",
    "a small orange square below a cyan triangle",
    "a white circle on a black background",
]
TEST_PROMPTS = ["a blue circle right of a red triangle", "a yellow square above a green circle"]
SAMPLING = {"num_inference_steps": 1, "guidance_scale": 0.0, "height": 64, "width": 64}


def psnr_db(reference: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR of float images in [0, 1] (no uint8 round trip, so no wrap-around)."""
    return (10 * torch.log10(1.0 / (image - reference).pow(2).mean())).item()


def generate(pipe) -> torch.Tensor:
    """Same prompts and seed for every precision: only the UNet's quantization changes."""
    return pipe(prompt=TEST_PROMPTS, generator=torch.Generator().manual_seed(1234), output_type="pt", **SAMPLING).images


@pytest.fixture(scope="module")
def psnr_by_precision(random_pipe):
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe)
    calibrate(pipe, CALIBRATION_PROMPTS, num_inference_steps=1, height=64, width=64, act_bits=(8,), progress=False)
    layers = layer_inventory(pipe.unet)
    result = {}
    for weight_bits in (8, 4, 2):
        quantize_(pipe.unet, PrecisionConfig.uniform(layers, weight_bits, 8))
        result[weight_bits] = psnr_db(reference, generate(pipe))
    quantize_(pipe.unet, None)
    assert torch.equal(generate(pipe), reference), "quantization off must give the FP images back exactly"
    print(f"PSNR vs FP (dB): W8A8 {result[8]:.1f}, W4A8 {result[4]:.1f}, W2A8 {result[2]:.1f}")
    return result


def test_w8a8_images_close_to_fp(psnr_by_precision):
    # Measured on CPU (2-core dev box, random-weight fixture, 1 step, 64 px): W8A8 50.3 dB
    # (46.4 dB at 2 steps, 128 px). Threshold leaves ~8 dB of margin.
    assert psnr_by_precision[8] > 42.0, psnr_by_precision


def test_psnr_falls_monotonically_with_weight_bits(psnr_by_precision):
    # Measured (same setting): W8A8 50.3 > W4A8 36.5 > W2A8 23.7 dB; each step loses > 12 dB.
    assert psnr_by_precision[8] > psnr_by_precision[4] + 5.0, psnr_by_precision
    assert psnr_by_precision[4] > psnr_by_precision[2] + 5.0, psnr_by_precision
