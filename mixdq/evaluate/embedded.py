"""The embedded model's own judges, adapted to the evaluation interfaces: its tiny CLIP as a
:class:`~mixdq.evaluate.metrics.ClipScorer` and its rule-based checker as an
:data:`~mixdq.evaluate.runner.AlignmentChecker`. ``mixdq.tiny`` is imported only when they are called,
so evaluating a hub model never needs the embedded model's code or assets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixdq.evaluate.metrics import OpenClipScorer


def embedded_clip_scorer(path: str | Path | None = None) -> OpenClipScorer:
    """The tiny open_clip model shipped in ``assets/tiny-clip`` (or ``path``), loaded offline."""
    from mixdq.tiny.clip import TINY_CLIP_DIR, load_tiny_clip

    model, preprocess, tokenizer = load_tiny_clip(path if path is not None else TINY_CLIP_DIR)
    return OpenClipScorer(model, preprocess, tokenizer)


def embedded_checker(image: torch.Tensor, attributes: Any) -> bool:
    """Does ``image`` show every attribute of ``attributes`` (a caption string or a ``mixdq.tiny.data.Scene``)?"""
    from mixdq.tiny.checker import check

    return check(image, attributes).correct
