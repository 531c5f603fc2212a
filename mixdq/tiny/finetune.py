"""The short-prompt fine-tune of the shipped model and its evaluation, in one command (GPU):

    python -m mixdq.tiny.finetune OUT [--minutes 3]

The shipped UNet learns the partial captions (`mixdq.tiny.data.caption_mix`, 45 % full captions)
with the text encoders and VAE frozen. Writes OUT/tiny-sdxl (the pipeline, its UNet in shards under
16 MiB, train_log.txt, metrics.json, sample_grid.png, short_prompts.png) and, for comparison, the
shipped model's metrics on the same held-out captions (OUT/shipped_metrics.json, short_prompts_shipped.png).
`python -m mixdq.tiny.train --init OUT/tiny-sdxl --steps 0 --out DIR` writes the UNet back in one file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixdq.tiny import evaluate_model, train

SHIPPED = evaluate_model.DEFAULT_MODEL
RECIPE = ["--batch", "128", "--lr", "3e-4", "--ema", "0.995", "--warmup", "50", "--full-share", "0.45"]
EVALUATION = ["--n", "256", "--objects", "1", "2", "--steps", "4", "1", "--short-seeds", "16"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fine-tune the shipped tiny UNet on partial captions, then evaluate.")
    p.add_argument("out", type=Path)
    p.add_argument("--minutes", type=float, default=3.0, help="fine-tune time limit (EMA weights are saved)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    model = args.out / "tiny-sdxl"
    device = ["--device", args.device]
    train.main(
        ["--init", str(SHIPPED), "--out", str(model), "--steps", "1000000", "--unet-minutes", str(args.minutes)]
        + ["--log-every", "50", "--max-shard-size", "12MB", *RECIPE, *device]
    )
    evaluate_model.main(
        ["--model", str(model), "--json", str(model / "metrics.json"), *EVALUATION, *device]
        + ["--grid", str(model / "sample_grid.png"), "--short-grid", str(model / "short_prompts.png")]
    )
    evaluate_model.main(
        ["--model", str(SHIPPED), "--json", str(args.out / "shipped_metrics.json"), *EVALUATION, *device]
        + ["--checker-n", "200", "--short-grid", str(args.out / "short_prompts_shipped.png")]
    )


if __name__ == "__main__":
    main()
