"""Which 4-bit activation ranges serve a mixed config better (issue #23)?

`calibrate` records the A4 ranges in a pass with every layer at A4, a network state no mixed config runs;
MixDQ takes every bit's ranges from one pass. This probe quantizes the embedded model with mixed activations
(a seeded share of layers at A4, the rest A8, weights FP) twice, once with the A4 pass's ranges and once with the
A8 pass's ranges for the A4 layers, and compares the images with FP (PSNR, same noise).

    python bench/lab/a4_ranges_probe.py --share 0.3 --prompts 8 --out bench/lab/a4_ranges_probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from mixdq.calibrate import ActivationRanges, calibrate
from mixdq.config import PrecisionConfig
from mixdq.evaluate.metrics import psnr
from mixdq.inventory import layer_inventory
from mixdq.models import load_pipeline
from mixdq.numerics import fp32_numerics
from mixdq.quant import quantize_
from mixdq.tiny.data import sample_scenes
from mixdq.tiny.evaluate_model import EVAL_SEED


def images(pipe, prompts: list[str], steps: int) -> torch.Tensor:
    out = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(i)
        out.append(
            pipe(prompt, num_inference_steps=steps, guidance_scale=0.0, generator=generator, output_type="pt").images
        )
    return torch.cat(out)


@fp32_numerics()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--share", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(device="cpu")
    layers = layer_inventory(pipe.unet)
    ranges = calibrate(pipe, num_inference_steps=args.steps, cache_dir=Path(".cache"))
    one_pass = ActivationRanges({4: ranges.ranges[8], 8: ranges.ranges[8]}, ranges.provenance)
    prompts = sample_scenes(args.prompts, np.random.default_rng(EVAL_SEED)).captions()  # held out
    quantize_(pipe, None, ranges)
    fp = images(pipe, prompts, args.steps)
    rows = []
    for share in args.share:
        for seed in range(args.seeds if share < 1 else 1):
            names = [i.name for i in layers]
            a4 = set(random.Random(seed).sample(names, round(share * len(names))))
            config = PrecisionConfig(weight_bits={}, act_bits={n: 4 if n in a4 else 8 for n in names})
            row = {"share_a4": share, "seed": seed, "a4_layers": len(a4)}
            for label, source in (("a4_pass", ranges), ("a8_pass", one_pass)):
                quantize_(pipe, config, source)
                row[f"psnr_{label}"] = psnr(fp, images(pipe, prompts, args.steps))
            rows.append(row)
            print(row, flush=True)
            args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
