"""Write the calibration captions (assets/prompts.txt): generator captions from a fixed seed.

    python -m mixdq.tiny.prompts --out assets/prompts.txt --n 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mixdq.tiny.data import sample_scenes

PROMPTS_SEED = 4_000_003  # apart from the training, evaluation and grid seeds


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
