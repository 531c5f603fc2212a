"""Sensitivity sweep of a model (default: the embedded one), written where the studio finds it.

    python bench/sweep_embedded.py --out assets/tiny-sdxl/sensitivity.csv [--device cuda] [--prompts 16]
    python bench/sweep_embedded.py --group content --steps 4 --out bench/results/tiny_content_ssim_4steps.csv

Calibrates (all candidate activation bits), sweeps every layer at every candidate bit (weight-only,
then activation-only) and writes the table plus a JSON with provenance, timings and the cost of one
evaluation in batched-UNet-forward equivalents. Everything runs in IEEE FP32 (no TF32 for matmul or
cuDNN, cuDNN deterministic: :func:`mixdq.numerics.fp32_numerics`); the JSON records those settings.
Imports only what the sweep needs (no PuLP/Gradio), so it runs on a bare GPU machine with diffusers
carried as a wheel.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mixdq.calibrate import calibrate, default_prompts
from mixdq.models import load_pipeline
from mixdq.numerics import fp32_numerics, numerics_settings
from mixdq.sensitivity.sweep import SweepSettings, run_sweep
from mixdq.sensitivity.table import write_table


@fp32_numerics()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=16, help="prompts from assets/prompts.txt (default 16)")
    parser.add_argument(
        "--calibration-prompts", type=int, default=None, help="prompts for calibration (default: all 64)"
    )
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (default 1, as MixDQ's published data)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--layers", type=int, default=None, help="sweep only the first N layers (timing runs)")
    parser.add_argument(
        "--group", choices=["all", "content", "quality"], default="all",
        help="sweep one group's layers only (e.g. content layers at another step count); the table is written",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="table CSV; a .json with the same stem gets the stats")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    prompts = default_prompts()[: args.prompts]
    started = time.perf_counter()
    ranges = calibrate(
        pipe,
        default_prompts()[: args.calibration_prompts],
        num_inference_steps=args.steps,
        seed=args.seed,
        height=size,
        width=size,
    )
    calibration_seconds = time.perf_counter() - started
    from mixdq.inventory import forward_order_key, layer_inventory

    inventory = [i for i in layer_inventory(pipe.unet) if args.group in ("all", i.group)]
    names = sorted((i.name for i in inventory), key=forward_order_key)
    layers = tuple(names[: args.layers]) if args.layers or args.group != "all" else None
    settings = SweepSettings(
        prompts=tuple(prompts), num_inference_steps=args.steps, seed=args.seed, height=size, width=size, layers=layers
    )
    table, stats = run_sweep(pipe, ranges, settings, act_ranges_key=ranges.provenance.get("prompts_sha256", ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.layers is None:  # a whole group, or every layer
        write_table(table, args.out)
    report = {
        "model_id": pipe.model_id,
        "device": torch.cuda.get_device_name()
        if pipe.unet.device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if pipe.unet.device.type == "cuda" else None,
        "numerics": numerics_settings(),  # what the calibration and the sweep ran in (both record it too)
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in asdict(settings).items() if k != "prompts"} | {"num_prompts": len(prompts)},
        "calibration_seconds": calibration_seconds,
        "evaluations": stats.evaluations,
        "sweep_seconds": stats.seconds,
        "seconds_per_eval": stats.seconds_per_eval,
        "unet_forward_seconds": stats.unet_forward_seconds,
        "unet_forward_equivalents_per_eval": stats.unet_forward_equivalents(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
