"""Measure the embedded model: text alignment of generated images, the checker, CLIP score, CPU latency.

    python -m mixdq.tiny.evaluate_model --model assets/tiny-sdxl --json metrics.json \
        --grid assets/tiny-sdxl/sample_grid.png --short-grid assets/tiny-sdxl/short_prompts.png

Alignment = the share of images whose every caption attribute the checker reads back right, on
held-out captions (a seed the training never draws from), per object count and step count: full
captions, partial ones (at least one of size, position, background left open, in random
phrasings; only the named attributes count), and the short prompts of `mixdq.tiny.prompts`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from mixdq.models import TURBO_SAMPLING, prompt_language, read_prompt
from mixdq.tiny import CLIP_WEIGHTS_FILE, TINY_CLIP_DIR
from mixdq.tiny.checker import check
from mixdq.tiny.data import Scene, parse_caption, partial_captions, render, sample_scenes
from mixdq.tiny.prompts import SHORT_PROMPTS

EVAL_SEED = 1_000_003  # held out: training draws from seeds 0-12
CHECKER_SEED = 2_000_003
GRID_SEED = 3_000_003
PARTIAL_SEED = 5_000_003
SHORT_GRID_SEEDS = 4  # images per short prompt in the grid
SECTIONS = ("full", "partial", "short", "checker", "latency")
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "tiny-sdxl"


@torch.no_grad()
def generate(
    pipe: StableDiffusionXLPipeline, captions: list[str], steps: int, seed: int = 0, batch: int = 64
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; image i uses noise seed `seed + i`, whatever the batching."""
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i : i + batch]
        generators = [torch.Generator(pipe.device).manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=TURBO_SAMPLING.guidance_scale,
            generator=generators,
            output_type="pt",
        ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def alignment(images: torch.Tensor, scenes: list[Scene]) -> float:
    return float(np.mean([check(img, scene).correct for img, scene in zip(images, scenes)]))


def checker_accuracy(n: int, partial: bool = False) -> float:
    """The checker on rendered ground truth: full captions, or partial descriptions of them."""
    rng = np.random.default_rng(CHECKER_SEED + partial)
    batch = sample_scenes(n, rng)
    expected = partial_captions(batch.scenes, rng)[0] if partial else batch.scenes
    return alignment(render(batch), expected)


def held_out_partial(n: int, objects: int) -> tuple[list[Scene], list[str]]:
    """`n` partial captions of `objects`-object scenes from a seed the training never draws from."""
    rng = np.random.default_rng(PARTIAL_SEED + objects)
    return partial_captions(sample_scenes(n, rng, object_counts=(objects,)).scenes, rng)


def short_prompt_images(
    pipe: StableDiffusionXLPipeline, seeds: int, steps: int = 4, read: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """Each short prompt with noise seeds 0..seeds-1, prompt-major; `read`: as the product gives them to the
    pipeline (`mixdq.models.read_prompt`), else as typed (the UNet alone)."""
    captions = [p for p in SHORT_PROMPTS for _ in range(seeds)]
    given = [read_prompt(pipe, p).text if read else p for p in SHORT_PROMPTS]
    images = torch.cat([generate(pipe, [p] * seeds, steps) for p in given])
    return images, captions


def cpu_latency(pipe: StableDiffusionXLPipeline, steps: int = 4, repeats: int = 5) -> float:
    """Median seconds for one image on the CPU (the caller sets the thread count)."""
    caption = sample_scenes(1, np.random.default_rng(EVAL_SEED)).captions()
    pipe(caption, num_inference_steps=steps, guidance_scale=TURBO_SAMPLING.guidance_scale)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pipe(caption, num_inference_steps=steps, guidance_scale=TURBO_SAMPLING.guidance_scale)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def save_grid(images: torch.Tensor, path: Path, columns: int = 4) -> None:
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(rows * columns, c, h, w)
    grid[:n] = images
    grid = grid.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def _load_clip(folder: Path):
    """(model, tokenizer, clip_score) of the tiny CLIP, or None where its weights or open_clip are
    missing (a bare GPU machine scores alignment only)."""
    if not (folder / CLIP_WEIGHTS_FILE).exists():
        return None
    try:
        from mixdq.tiny.clip import clip_score, load_tiny_clip
    except ImportError as e:
        print(f"CLIP scores skipped: {e}")
        return None
    model, _, tokenizer = load_tiny_clip(folder)
    return model, tokenizer, clip_score


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate the embedded tiny model.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--clip", type=Path, default=TINY_CLIP_DIR, help="tiny CLIP folder; skipped without open_clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=256, help="held-out captions per object count")
    p.add_argument("--objects", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 1])
    p.add_argument("--checker-n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the latency measurement")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None, help="write a 4x4 sample grid (4 steps) here")
    p.add_argument(
        "--short-grid",
        type=Path,
        default=None,
        help=f"write the short prompts (up to {SHORT_GRID_SEEDS} seeds each, two prompts a row) here",
    )
    p.add_argument("--short-seeds", type=int, default=16, help="noise seeds per short prompt for their alignment")
    p.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)"
    )
    args = p.parse_args(argv)

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    pipe.to(args.device).set_progress_bar_config(disable=True)
    pipe.prompt_language = prompt_language(args.model)
    clip = _load_clip(args.clip)
    metrics: dict = {"model": str(args.model), "device": args.device, "dtype": "float32", "n_per_object_count": args.n}
    if args.device.startswith("cuda"):
        metrics["card"] = torch.cuda.get_device_name()
    for k in args.objects if "full" in args.sections else ():
        batch = sample_scenes(args.n, np.random.default_rng(EVAL_SEED + k), object_counts=(k,))
        for steps in args.steps:
            images = generate(pipe, batch.captions(), steps)
            metrics[f"alignment_{k}obj_{steps}step"] = alignment(images, batch.scenes)
            if clip is not None:
                model, tokenizer, clip_score = clip
                tokens = tokenizer(batch.captions())
                metrics[f"clip_score_{k}obj_{steps}step"] = clip_score(model, images, tokens).mean().item()
                metrics[f"clip_score_{k}obj_rendered"] = clip_score(model, render(batch), tokens).mean().item()
            print({key: round(v, 4) for key, v in metrics.items() if isinstance(v, float)}, flush=True)
    for k in args.objects if "partial" in args.sections else ():
        scenes, captions = held_out_partial(args.n, k)
        read = [read_prompt(pipe, c).text for c in captions]
        for steps in args.steps:
            metrics[f"alignment_partial_{k}obj_{steps}step"] = alignment(generate(pipe, captions, steps), scenes)
            if pipe.prompt_language is not None:
                metrics[f"alignment_partial_{k}obj_{steps}step_read"] = alignment(generate(pipe, read, steps), scenes)
        metrics[f"partial_caption_examples_{k}obj"] = captions[:8]
        print({key: round(v, 4) for key, v in metrics.items() if isinstance(v, float)}, flush=True)
    seeds = args.short_seeds
    for suffix, read in (("", False), ("_read", True)) if "short" in args.sections else ():
        if read and pipe.prompt_language is None:
            continue
        images, captions = short_prompt_images(pipe, seeds, read=read)
        correct = [check(img, parse_caption(c)).correct for img, c in zip(images, captions)]
        metrics[f"alignment_short_prompts_4step{suffix}"] = float(np.mean(correct))
        metrics[f"alignment_per_short_prompt_4step{suffix}"] = {
            prompt: float(np.mean(correct[j * seeds : (j + 1) * seeds])) for j, prompt in enumerate(SHORT_PROMPTS)
        }
        print({key: round(v, 4) for key, v in metrics.items() if isinstance(v, float)}, flush=True)
    metrics["short_prompt_seeds"] = seeds
    if args.short_grid is not None and "short" in args.sections:
        shown = min(seeds, SHORT_GRID_SEEDS)
        per_prompt = images.view(len(SHORT_PROMPTS), seeds, *images.shape[1:])[:, :shown]
        save_grid(per_prompt.reshape(-1, *images.shape[1:]), args.short_grid, columns=2 * shown)
        metrics["short_grid_prompts"] = list(SHORT_PROMPTS)
        metrics["short_grid_read"] = pipe.prompt_language is not None
    if "checker" in args.sections:
        metrics["checker_accuracy_rendered"] = checker_accuracy(args.checker_n)
        metrics["checker_accuracy_rendered_partial"] = checker_accuracy(args.checker_n, partial=True)
        metrics["checker_n"] = args.checker_n
    if args.grid is not None:
        batch = sample_scenes(16, np.random.default_rng(GRID_SEED))
        save_grid(generate(pipe, batch.captions(), 4), args.grid)
        metrics["grid_captions"] = batch.captions()
    if args.device == "cpu" and "latency" in args.sections:
        torch.set_num_threads(args.threads)
        metrics[f"cpu_latency_4step_s_{args.threads}threads"] = cpu_latency(pipe)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
