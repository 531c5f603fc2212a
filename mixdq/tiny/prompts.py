"""Prompts for the embedded model: the calibration captions (assets/prompts.txt, generator captions
from a fixed seed) and the short prompts a new user would type, for the model card and the studio.

    python -m mixdq.tiny.prompts --out assets/prompts.txt --n 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mixdq.tiny.data import sample_scenes

PROMPTS_SEED = 4_000_003  # apart from the training, evaluation and grid seeds
# Short and free-form, in forms `mixdq.tiny.data.parse_caption` reads; attributes left open vary with the seed.
SHORT_PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow disc",
    "a big white box",
    "a small purple circle",
    "an orange triangle on the left",
    "a red circle in the middle",
    "a blue box at the top",
    "black circle, white background",
    "a yellow square on a blue background",
    "a red circle and a blue square",
    "a green disc on the left and a white box on the right",
    "on a black background, a large orange triangle",
    "a purple triangle at the bottom on yellow",
    "a red circle, a green square and a blue triangle",
)


def calibration_prompts(n: int = 64, seed: int = PROMPTS_SEED) -> list[str]:
    return sample_scenes(n, np.random.default_rng(seed)).captions()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write calibration captions, one per line.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args(argv)
    args.out.write_text("\n".join(calibration_prompts(args.n)) + "\n")


if __name__ == "__main__":
    main()
