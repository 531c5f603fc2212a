"""The precision / quality frontier: allocations over a grid of budgets, precomputed for plots and lookup."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixdq.allocate.allocator import AUTO, Allocator

FRONT_COLUMNS: tuple[str, ...] = (
    "budget_bits",
    "average_bits",
    "mb",
    "k",
    "score",
    "content_bits",
    "quality_bits",
    "solver",
    "bits",
)


def budget_grid(allocator: Allocator, target: str = "weight", points: int = 50, k: float | str = AUTO) -> np.ndarray:
    """``points`` budgets (average bits, as the allocator counts them) spread over the feasible range of ``target``."""
    low, high = allocator.feasible_range(target, k)
    return np.linspace(low, high, points)


def pareto_front(
    allocator: Allocator,
    budgets: np.ndarray | list[float],
    target: str = "weight",
    k: float | str = AUTO,
    solver: str = "approx",
) -> pd.DataFrame:
    """One row per budget: achieved bits, MB (weights, with an inventory), K, score and per-layer bits.

    ``score`` is the side's size-weighted normalized objective (see
    :func:`mixdq.allocate.groups.allocation_score`); ``bits`` maps layer -> bit-width, so a plot's
    point can be turned back into a config. With the default greedy a 50-point front takes about a
    second; ``solver="cbc"`` gives the exact front in roughly 0.3 s per point.
    """
    rows = []
    for budget in budgets:
        side = allocator.allocate_side(target, float(budget), k, solver)
        mb = allocator.bits_to_mb(side.average_bits) if target == "weight" and allocator.scale is not None else None
        rows.append(
            (
                float(budget),
                side.average_bits,
                mb,
                side.k,
                side.score,
                side.groups["content"].average,
                side.groups["quality"].average,
                side.solver,
                side.bits,
            )
        )
    return pd.DataFrame(rows, columns=list(FRONT_COLUMNS))
