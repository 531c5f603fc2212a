"""Choosing K = b_content / b_quality by generating images: MixDQ's last search step.

The authors' search ends with "similar configurations [on the integer program's frontier] are tested with
image generation / metric ranking to determine the final ones". The allocator's own ``k="auto"`` instead
ranks K by the per-layer sensitivities summed and normalized per group, which cannot see layers' joint
effect: when one group's metric is nearly flat one layer at a time (the embedded model's content SSIM,
0.99998 at 2 bits for the median layer, because one layer rarely moves a flat-colour image), that ranking
sends most of the group to its lowest bits, although together those layers do change the images.
:func:`select_k` scores each candidate's whole allocation end to end on held-out prompts with an image
metric and keeps the best, which measures exactly that joint effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixdq.allocate import AUTO, AllocationResult, Allocator
from mixdq.evaluate.runner import evaluate

# The evaluation columns a K can be ranked by, and whether higher is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr_db": True,
    "ssim": True,
    "clip_score": True,
    "alignment": True,
    "fd": False,
    "inception_fid": False,
}
DEFAULT_METRIC = "psnr_db"  # needs no pretrained network; the pooled MSE weighs big (shape) errors most
DEFAULT_CANDIDATES = 5


@dataclass(frozen=True)
class KSelection:
    """The chosen K, its allocation, and every candidate's scores (one row per K, ``auto`` marks the
    allocator's own choice)."""

    k: float
    metric: str
    result: AllocationResult
    table: pd.DataFrame

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what was compared and how each K scored."""
        columns = [c for c in ("k", "auto", "content_bits", "quality_bits", self.metric) if c in self.table]
        return {
            "k": self.k,
            "metric": self.metric,
            "candidates": self.table[columns].to_dict(orient="records"),
            **{key: value for key, value in self.table.attrs.items() if key in ("num_prompts", "num_inference_steps")},
        }


def k_candidates(allocator: Allocator, weight_bits: float, count: int = DEFAULT_CANDIDATES) -> list[float]:
    """``count`` K values spread over the budget's feasible range, plus the allocator's own auto K."""
    if count < 1:
        raise ValueError(f"need at least one K candidate, got {count}.")
    auto = allocator.allocate_side("weight", weight_bits, AUTO, "approx").k
    return sorted({*allocator.k_grid("weight", weight_bits, count), round(auto, 12)})


def select_k(
    pipe,
    allocator: Allocator,
    weight_bits: float,
    act_bits: float | None,
    prompts: Sequence[str],
    ks: Sequence[float] | None = None,
    metric: str = DEFAULT_METRIC,
    solver: str = "cbc",
    weight_clip: str = "minmax",
    **evaluate_kwargs: Any,
) -> KSelection:
    """Allocate ``weight_bits`` (activations at ``act_bits``) at each K of ``ks`` (default
    :func:`k_candidates`), generate every allocation's images for ``prompts`` and keep the K whose images
    score best on ``metric`` (a column of :func:`mixdq.evaluate.evaluate`, see :data:`HIGHER_IS_BETTER`).

    ``prompts`` must be held out from the prompts the result is reported on, or the choice is tuned on
    the test set. ``evaluate_kwargs`` go to :func:`mixdq.evaluate.evaluate` (seeds, steps, calibration,
    a scorer or checker when ``metric`` needs one). Ties go to the smaller K. ``weight_clip``: the weight
    scales every candidate (and the result) uses (:class:`~mixdq.config.PrecisionConfig`).
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric {metric!r} is not one of {list(HIGHER_IS_BETTER)}.")
    ks = k_candidates(allocator, weight_bits) if ks is None else sorted({float(k) for k in ks})
    if not ks:
        raise ValueError("ks is empty; pass at least one K or None for the default candidates.")
    auto = allocator.allocate_side("weight", weight_bits, AUTO, "approx").k
    results = {k: allocator.allocate(weight_bits=weight_bits, act_bits=act_bits, k=k, solver=solver) for k in ks}
    for result in results.values():
        result.config.weight_clip = weight_clip
    # Neighbouring K can give the same bits (coarse layer sizes): generate each distinct allocation once.
    first = {}
    for k in ks:
        first.setdefault(_bits_key(results[k]), k)
    names = {k: f"K={first[_bits_key(results[k])]:.4f}" for k in ks}
    unique = {names[k]: results[k].config for k in ks if first[_bits_key(results[k])] == k}
    scores = evaluate(pipe, unique, prompts, **evaluate_kwargs).set_index("config")
    if metric not in scores:
        raise ValueError(
            f"metric {metric!r} was not measured; pass what it needs (a scorer, or a checker and attributes)."
        )
    table = scores.loc[[names[k] for k in ks]].reset_index()
    table.attrs = scores.attrs
    table.insert(0, "k", ks)
    table.insert(1, "auto", [bool(np.isclose(k, auto)) for k in ks])
    table.insert(2, "content_bits", [results[k].weight.groups["content"].average for k in ks])
    table.insert(3, "quality_bits", [results[k].weight.groups["quality"].average for k in ks])
    values = table[metric].to_numpy(dtype=float)
    best = int(np.argmax(values if HIGHER_IS_BETTER[metric] else -values))  # first best: the smaller K
    selection = KSelection(k=ks[best], metric=metric, result=results[ks[best]], table=table)
    results[ks[best]].config.metadata.setdefault("allocation", {})["k_selection"] = _json_ready(selection.summary())
    return selection


def _bits_key(result: AllocationResult) -> tuple:
    config = result.config
    return tuple(sorted(config.weight_bits.items())), tuple(sorted(config.act_bits.items()))


def _json_ready(value: Any) -> Any:
    """Plain Python numbers (numpy scalars do not serialize)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
