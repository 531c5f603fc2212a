"""Quality evaluation: FP vs quantized images from identical noise, scored by SSIM/PSNR, CLIP score,
Fréchet distance on CLIP features and exact alignment, one table row per precision config; and MixDQ's
last search step, choosing K by generating images (:func:`select_k`)."""

from mixdq.evaluate.embedded import embedded_checker, embedded_clip_scorer
from mixdq.evaluate.k_selection import KSelection, k_candidates, select_k
from mixdq.evaluate.metrics import (
    ClipScorer,
    MetricUnavailableError,
    OpenClipScorer,
    clip_score,
    cosine_score,
    frechet_distance,
    inception_fid_metric,
    psnr,
    ssim,
)
from mixdq.evaluate.runner import AlignmentChecker, evaluate, load_results, save_results

__all__ = [
    "AlignmentChecker",
    "ClipScorer",
    "KSelection",
    "MetricUnavailableError",
    "OpenClipScorer",
    "clip_score",
    "cosine_score",
    "embedded_checker",
    "embedded_clip_scorer",
    "evaluate",
    "frechet_distance",
    "inception_fid_metric",
    "k_candidates",
    "load_results",
    "psnr",
    "save_results",
    "select_k",
    "ssim",
]
