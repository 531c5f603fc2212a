"""Quality evaluation: FP vs quantized images from identical noise, scored by SSIM/PSNR, CLIP score,
Fréchet distance on CLIP features and exact alignment, one table row per precision config."""

from mixdq.evaluate.embedded import embedded_checker, embedded_clip_scorer
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
    "MetricUnavailableError",
    "OpenClipScorer",
    "clip_score",
    "cosine_score",
    "embedded_checker",
    "embedded_clip_scorer",
    "evaluate",
    "frechet_distance",
    "inception_fid_metric",
    "load_results",
    "psnr",
    "save_results",
    "ssim",
]
