"""MixDQ's group rules: which bits each group may take, and how a global target splits into group targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.sensitivity.table import GROUPS, TARGETS

# Quality layers never get fewer weight bits than this: MixDQ gives 2-bit weights to content layers only,
# because a 2-bit quality layer (resnets, attn1, projections) wrecks the image, not just its details.
QUALITY_MIN_BITS = 4


def candidate_bits(target: str, group: str) -> tuple[int, ...]:
    """Candidate bit-widths of ``group`` for ``target``: weights content {2,4,8}, quality {4,8}; acts {4,8}."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {list(TARGETS)}.")
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {list(GROUPS)}.")
    bits = WEIGHT_BITS if target == "weight" else ACT_BITS
    return bits if group == "content" else tuple(b for b in bits if b >= QUALITY_MIN_BITS)


def group_targets(budget: float, k: float, r: float) -> dict[str, float]:
    """Split an average-bit target ``budget`` into group targets with ratio ``k = b_content / b_quality``.

    MixDQ's formula ``b_q = B(1+r)/(K·r+1)``, ``b_c = K·b_q`` keeps the size-weighted average at B,
    with ``r`` = total size of content layers / quality layers.
    """
    if k <= 0:
        raise ValueError(f"K = b_content / b_quality must be positive, got {k!r}.")
    quality = budget * (1 + r) / (k * r + 1)
    return {"content": k * quality, "quality": quality}


@dataclass(frozen=True)
class GroupSolution:
    """One group's allocation and how good it is."""

    group: str
    bits: dict[str, int]  # layer -> chosen bit-width
    target: float  # the group's target average bits
    average: float  # size-weighted average bits achieved
    objective: float  # summed sensitivity of the chosen bits (the group's metric)
    normalized: float  # objective rescaled so all-lowest bits = 0 and all-highest bits = 1
    share: float  # the group's share of the allocated layers' total size


def normalized_objective(values: np.ndarray, choice: np.ndarray) -> tuple[float, float]:
    """(raw, normalized) objective of ``choice`` (bit index per layer) for a ``values`` matrix.

    Normalizing by the span from all-lowest to all-highest bits makes SQNR (dB) and SSIM groups
    comparable, which the best-K criterion (:func:`allocation_score`) and the solver gaps need.
    """
    raw = float(values[np.arange(len(choice)), choice].sum())
    low, high = float(values[:, 0].sum()), float(values[:, -1].sum())
    span = high - low
    return raw, (raw - low) / span if span > 0 else 0.0


def allocation_score(normalized: dict[str, float], share: dict[str, float]) -> float:
    """The best-K criterion: groups' normalized objectives weighted by their share of the layer size.

    A group holding 69% of the weights (SDXL's content group) counts for 69%; MixDQ's reference
    script defines the same weights (``ssim_weight = r``, ``sqnr_weight = 1``). 1 = all layers at
    their highest bits, 0 = all at their lowest.
    """
    return sum(share[g] * normalized[g] for g in normalized)
