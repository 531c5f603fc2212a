"""A millisecond approximate solver for the per-group allocation, for live slider preview.

It is the classic greedy for the multiple-choice knapsack, i.e. the Lagrangian relaxation solved
exactly: each layer's bit choices are reduced to the upper concave hull of (average-bit cost,
sensitivity); the hull's upgrade steps of all layers are sorted once by sensitivity gained per bit
spent; a solve walks them, taking every step that still fits under ``target + band``. If the result
sits below ``target - band`` (the steps left are all too big, or gain nothing), it is lifted into
the band by the cheapest-loss upgrades, shedding bits elsewhere if an upgrade overshoots. Its gap to the exact ILP is measured in ``tests/test_allocate_approx.py``.
"""

from __future__ import annotations

import itertools

import numpy as np

from mixdq.sensitivity.table import GroupMatrix

_TOLERANCE = 1e-12


class ApproxGroupSolver:
    """One group's greedy, with the sorted upgrade steps precomputed (they do not depend on the budget)."""

    def __init__(self, matrix: GroupMatrix) -> None:
        self.matrix = matrix
        weights = matrix.sizes / matrix.sizes.sum()
        self.cost = weights[:, None] * np.asarray(matrix.bits, dtype=float)[None, :]
        steps = self._best_first(
            [(i, a, b) for i in range(len(weights)) for a, b in _hull_steps(self.cost[i], matrix.values[i])]
        )
        self.step_layer, self.step_to = (np.array([s[k] for s in steps], dtype=int) for k in (0, 2))
        self.step_extra = np.array([self.cost[i, b] - self.cost[i, a] for i, a, b in steps])
        self.steps = steps
        # Every single-layer upgrade, best gain per bit first: the repair moves for a too-low result.
        m = len(matrix.bits)
        self.moves = self._best_first(
            [(i, a, b) for i in range(len(weights)) for a in range(m) for b in range(a + 1, m)]
        )

    def _best_first(self, moves: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        slope = [_slope(self.cost[i], self.matrix.values[i], a, b) for i, a, b in moves]
        return [moves[k] for k in np.argsort(-np.asarray(slope), kind="stable")]

    def solve(self, target: float, band: float) -> np.ndarray | None:
        """Bit index per layer with average bits in ``target ± band``, or ``None`` if the greedy misses the band."""
        high, low = target + band + _TOLERANCE, target - band - _TOLERANCE
        choice = np.zeros(len(self.cost), dtype=int)
        spent = float(self.cost[:, 0].sum())
        if spent > high:
            return None
        # The leading run of steps that fits is taken at once (a layer's hull steps come in order,
        # so the last one taken per layer is its highest); the rest one by one, when they still fit.
        # A skipped step leaves its layer below the next step's starting bit, which then is skipped too.
        taken = int(np.searchsorted(spent + np.cumsum(self.step_extra), high, side="right"))
        np.maximum.at(choice, self.step_layer[:taken], self.step_to[:taken])
        spent += float(self.step_extra[:taken].sum())
        for k in taken + np.flatnonzero(self.step_extra[taken:] <= high - spent):
            i, a, b = self.steps[k]
            if choice[i] == a and spent + self.step_extra[k] <= high:
                choice[i], spent = b, spent + self.step_extra[k]
        if spent < low:
            spent = self._lift(choice, spent, low, high)
        return choice if low <= spent <= high else None

    def _lift(self, choice: np.ndarray, spent: float, low: float, high: float) -> float:
        """Raise a too-low ``choice`` (in place) into the band; returns the new average bits.

        First the best upgrades that still fit; if every remaining upgrade overshoots the band, take
        the best one that reaches it and shed the bits that cost the least sensitivity per bit.
        """
        for i, a, b in self.moves:
            extra = self.cost[i, b] - self.cost[i, a]
            if choice[i] == a and spent + extra <= high:
                choice[i], spent = b, spent + extra
                if spent >= low:
                    return spent
        for i, a, b in self.moves:
            extra = self.cost[i, b] - self.cost[i, a]
            if choice[i] == a and spent + extra >= low:
                choice[i], spent = b, spent + extra
                break
        for i, a, b in reversed(self.moves):
            if spent <= high:
                break
            saved = self.cost[i, b] - self.cost[i, a]
            if choice[i] == b and spent - saved >= low:
                choice[i], spent = a, spent - saved
        return spent


def _hull_steps(cost: np.ndarray, value: np.ndarray) -> list[tuple[int, int]]:
    """Upgrade steps (from, to) along the upper concave hull of one layer's (cost, value) points.

    Only steps that gain sensitivity are kept; a bit whose point lies under the hull is skipped,
    because the greedy would never stop there.
    """
    hull = [0]
    for j in range(1, len(cost)):
        while len(hull) >= 2 and _slope(cost, value, hull[-2], hull[-1]) <= _slope(cost, value, hull[-1], j):
            hull.pop()
        hull.append(j)
    return [(a, b) for a, b in itertools.pairwise(hull) if value[b] > value[a]]


def _slope(cost: np.ndarray, value: np.ndarray, a: int, b: int) -> float:
    return (value[b] - value[a]) / (cost[b] - cost[a])
