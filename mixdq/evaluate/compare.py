"""FP16, simulated and deployed images of one prompt and seed, with what each costs: the Compare view and
``python -m mixdq compare``.

The deployed image is the one to judge (packed weights on the kernels, what ships). The fake-quant simulation
is the reference every quality table uses, so its distance to the deployed image is shown too: it tells the
user how far the tables can be trusted for this config.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixdq.config import PrecisionConfig
from mixdq.deploy.runner import DeployedRunner, DeployedUNet, Generation, config_key, fp8_fallback
from mixdq.evaluate.metrics import psnr, ssim
from mixdq.inventory import layer_inventory, non_layer_param_count
from mixdq.memory import weight_memory
from mixdq.models import read_prompt
from mixdq.quant import quantize_


def pair_metrics(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """SSIM and PSNR (dB; inf for identical images) of one (3, H, W) image in [0, 1] against another."""
    return {"ssim": float(ssim(reference[None], test[None])[0]), "psnr": psnr(reference[None], test[None])}


@dataclass(frozen=True)
class Comparison:
    """Everything the Compare view shows for one click."""

    config: PrecisionConfig  # what ran (after any fallback in ``notes``)
    prompt: str  # as typed
    prompt_read: str  # what the pipeline was given (mixdq.models.read_prompt; a line in ``notes`` if it differs)
    seed: int
    steps: int
    size: int
    fp16: Generation
    simulated: Generation
    deployed: Generation
    deploy: DeployedUNet
    deployed_vs_fp16: dict[str, float]
    simulated_vs_fp16: dict[str, float]
    deployed_vs_simulated: dict[str, float]
    fp16_bytes: int  # the UNet's weights in FP16 (exact accounting)
    accounted_bytes: int  # the config's exact accounting (mixdq.memory)
    kernel_path: str
    redeployed: bool  # this call deployed the config (False: the deployed UNet of the previous call was reused)
    notes: tuple[str, ...]

    @property
    def measured_bytes(self) -> int:
        """Bytes the deployed UNet holds on its device: the allocator's delta on CUDA, its tensors on the CPU."""
        measured = self.deploy.measured_bytes
        return self.deploy.report.weight_bytes if measured is None else measured


def median_step_ms(generation: Generation) -> float:
    return statistics.median(generation.step_ms) if generation.step_ms else float("nan")


def compare(
    runner: DeployedRunner,
    config: PrecisionConfig,
    act_ranges,
    prompt: str,
    seed: int,
    steps: int,
    size: int,
    on_stage: Callable[[str], None] = lambda _: None,
    compiled: bool = False,
) -> Comparison:
    """FP16, fake-quant and deployed images of ``prompt`` from the same noise, with times, memory and metrics.

    The pipeline's UNet is left fake-quantized with ``config`` (the simulation), the deployed copy is kept for
    the next call with the same config (a new config re-deploys from the FP weights without reloading).
    ``compiled``: time the deployed UNet and the FP16 baseline compiled (:meth:`DeployedRunner.compile`; the
    first image of each config and shape waits for the compile).
    """
    pipe = runner.pipe
    layers = layer_inventory(runner.fp_unet)
    config.validate(layers)
    config, note = fp8_fallback(config, runner.device)
    reading = read_prompt(pipe, prompt)
    notes = tuple(n for n in (reading.note, note) if n)
    prompt_read = reading.text
    reused = runner.current is not None and runner.current.key == config_key(config)
    on_stage("simulating (fake-quant)")
    quantize_(pipe, config, act_ranges)
    deployed_unet = runner.deploy(config, act_ranges, on_stage)
    if compiled:
        runner.compile(on_stage)
    on_stage("FP16 image")
    fp16 = runner.generate("fp16", prompt_read, seed, steps, size)
    on_stage("simulated image")
    simulated = runner.generate("simulated", prompt_read, seed, steps, size)
    on_stage("deployed image")
    deployed = runner.generate("deployed", prompt_read, seed, steps, size)
    other = non_layer_param_count(runner.fp_unet)
    return Comparison(
        config=config,
        prompt=prompt,
        prompt_read=prompt_read,
        seed=seed,
        steps=steps,
        size=size,
        fp16=fp16,
        simulated=simulated,
        deployed=deployed,
        deploy=deployed_unet,
        deployed_vs_fp16=pair_metrics(fp16.image, deployed.image),
        simulated_vs_fp16=pair_metrics(fp16.image, simulated.image),
        deployed_vs_simulated=pair_metrics(simulated.image, deployed.image),
        fp16_bytes=weight_memory(layers, None, other).total_bytes,
        accounted_bytes=weight_memory(layers, config, other).total_bytes,
        kernel_path=runner.kernel_path,
        redeployed=not reused,
        notes=notes,
    )
