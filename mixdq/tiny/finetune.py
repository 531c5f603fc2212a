"""The short-prompt fine-tune of the shipped model and its evaluation, in one command (GPU):

    python -m mixdq.tiny.finetune OUT [--minutes 5] [--open-attributes default|random] [--lr 1e-4] [--pack NAME]

The shipped UNet learns partial captions (`mixdq.tiny.data.training_pairs`, half of them full
captions) with the text encoders and VAE frozen. Writes OUT/tiny-sdxl (the pipeline, its UNet in
shards under 16 MiB, train_log.txt, metrics.json, sample_grid.png, short_prompts.png) and, for
comparison, the shipped model's metrics on the same held-out captions (OUT/shipped_metrics.json,
short_prompts_shipped.png). `--pack NAME` also writes the UNet, the logs, metrics and grids as
OUT/NAME.tar.00, .01, ... (parts under 15 MiB: few files come back from a GPU machine); unpack with
`cat NAME.tar.* | tar x`. The text encoders, tokenizers and VAE stay the shipped ones, so only the
UNet is installed: `python -m mixdq.tiny.train --init DIR --steps 0 --out NEW` writes it as one file.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from mixdq.tiny import evaluate_model, train
from mixdq.tiny.data import OPEN_ATTRIBUTES

SHIPPED = evaluate_model.DEFAULT_MODEL
# A gentler rate than from-scratch training and half full captions, so the fine-tune keeps what the
# model knows of full captions (the run that showed it: assets/tiny-sdxl/README.md, Training, step 4).
RECIPE = ["--batch", "128", "--ema", "0.995", "--warmup", "50", "--full-share", "0.5"]
EVALUATION = ["--n", "256", "--objects", "1", "2", "--steps", "4", "1", "--short-seeds", "16"]
PART_BYTES = 15 * 2**20
PACKED = ("unet", "train_log.txt", "metrics.json", "sample_grid.png", "short_prompts.png")


def pack(folder: Path, out: Path, name: str) -> list[Path]:
    """The fine-tune's own files (not the frozen parts) as one tar split into parts under 15 MiB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for item in PACKED:
            if (folder / item).exists():
                tar.add(folder / item, arcname=f"{name}/{item}")
    data = buffer.getvalue()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        parts.append(out / f"{name}.tar.{i // PART_BYTES:02d}")
        parts[-1].write_bytes(data[i : i + PART_BYTES])
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fine-tune the shipped tiny UNet on partial captions, then evaluate.")
    p.add_argument("out", type=Path)
    p.add_argument("--minutes", type=float, default=5.0, help="fine-tune time limit (EMA weights are saved)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--open-attributes", choices=OPEN_ATTRIBUTES, default="default")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pack", default=None, metavar="NAME", help="also write OUT/NAME.tar.NN (see above)")
    p.add_argument("--skip-shipped", action="store_true", help="do not evaluate the shipped model again")
    args = p.parse_args(argv)
    model = args.out / "tiny-sdxl"
    device = ["--device", args.device]
    train.main(
        ["--init", str(SHIPPED), "--out", str(model), "--steps", "1000000", "--unet-minutes", str(args.minutes)]
        + ["--lr", str(args.lr), "--open-attributes", args.open_attributes]
        + ["--log-every", "50", "--max-shard-size", "12MB", *RECIPE, *device]
    )
    evaluate_model.main(
        ["--model", str(model), "--json", str(model / "metrics.json"), *EVALUATION, *device]
        + ["--grid", str(model / "sample_grid.png"), "--short-grid", str(model / "short_prompts.png")]
    )
    if args.pack:
        pack(model, args.out, args.pack)
    if not args.skip_shipped:
        evaluate_model.main(
            ["--model", str(SHIPPED), "--json", str(args.out / "shipped_metrics.json"), *EVALUATION, *device]
            + ["--checker-n", "200", "--short-grid", str(args.out / "short_prompts_shipped.png")]
        )


if __name__ == "__main__":
    main()
