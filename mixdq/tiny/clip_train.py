"""Train the tiny open_clip model on the procedural scenes and save it for `load_tiny_clip`.

    python -m mixdq.tiny.clip_train --out assets/tiny-clip

Symmetric InfoNCE over in-batch pairs; a large batch of random scenes gives hard negatives
(captions that differ in one attribute) for free. Fixed seed, data rendered on the device.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from mixdq.tiny.clip import (
    BPE_FILE,
    CONFIG_FILE,
    IMAGE_SIZE,
    WEIGHTS_FILE,
    build_model,
    build_tokenizer,
    model_config,
    preprocess_tensor,
)
from mixdq.tiny.components import IMAGE_SIZE as RENDER_SIZE
from mixdq.tiny.data import render, sample_scenes
from mixdq.tiny.train import Log, warmup_lr
from mixdq.tiny.vocab import write_open_clip_bpe


def retrieval_accuracy(model, tokenizer, n: int, seed: int, device: torch.device) -> float:
    """Image -> text top-1 accuracy among `n` held-out in-batch captions of rendered scenes."""
    batch = sample_scenes(n, np.random.default_rng(seed))
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess_tensor(render(batch, RENDER_SIZE, device))), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(batch.captions()).to(device)), dim=-1)
    return (img @ txt.T).argmax(1).eq(torch.arange(n, device=device)).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the tiny open_clip model.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=5.0, help="safety stop")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train_log.txt")
    log(f"args: {vars(args)}")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 10)
    write_open_clip_bpe(args.out / BPE_FILE)
    tokenizer = build_tokenizer(args.out / BPE_FILE)
    cfg = model_config()
    model = build_model(cfg).to(device).train()
    log(f"CLIP {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M params")
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2 and "logit_scale" not in n]
    other = [q for n, q in model.named_parameters() if not (q.ndim >= 2 and "logit_scale" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=args.lr
    )
    labels = torch.arange(args.batch, device=device)
    deadline = time.time() + args.minutes * 60
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * warmup_lr(step, 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = sample_scenes(args.batch, rng)
        images = preprocess_tensor(render(batch, RENDER_SIZE, device))
        tokens = tokenizer(batch.captions()).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            img, txt, scale = model(images, tokens)
            logits = scale * img.float() @ txt.float().T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == args.steps - 1:
            log(f"clip step {step} loss {loss.item():.4f} logit_scale {model.logit_scale.exp().item():.1f}")
        if time.time() > deadline:
            log(f"clip: time limit reached at step {step}")
            break
    model.eval()
    acc = retrieval_accuracy(model, tokenizer, 256, seed=12345, device=device)
    log(f"held-out image->text top-1 among 256 rendered scenes: {acc:.4f}")
    save_file(
        {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()},
        args.out / WEIGHTS_FILE,
    )
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "size": IMAGE_SIZE,
            "mean": OPENAI_DATASET_MEAN,
            "std": OPENAI_DATASET_STD,
            "interpolation": "bicubic",
        },
        "training": {"steps": step + 1, "batch": args.batch, "seed": args.seed, "retrieval_top1_256": acc},
    }
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
