"""MixDQ's per-group integer program, solved with PuLP (CBC or HiGHS).

Binary ``c[i, b]``, one bit per layer, maximize ``Σ c·S``, size-weighted average bits within
``target ± band``. Three things keep a 794-layer solve well under a second on 2 cores:

* the model is built once per group; a new budget only moves the band's two bounds;
* the objective is the normalized gain ``(S − S_lowest) / span`` (span = all-highest minus all-lowest
  total), the same optimum as ``Σ c·S``, so the stopping gap reads in normalized-objective units;
* symmetry breaking: of two layers with the same size, the one that gains more from every
  upgrade gets at least as many bits. Swapping the bits of such a pair never lowers the objective
  and keeps the size-weighted average, so an optimal solution obeys these constraints; without
  them the solver wastes its time on interchangeable layers (SDXL has only 7 distinct content and
  21 distinct quality layer sizes).

CBC runs with its integer preprocessing off: the bundled CBC 2.10.3's preprocessing fixes variables
wrongly on some of these programs (even 3-layer ones) and then reports the wrong answer as optimal;
``tests/test_allocate_exact.py`` checks both solvers against enumeration. Without preprocessing CBC is
as fast on the 794-layer SDXL data. HiGHS needs the symmetry breaking to stay fast there.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pulp

from mixdq.sensitivity.table import GroupMatrix

# The solver stops once its solution is proven within this much of the optimum, in normalized
# objective units (1 = all layers moved from the lowest to the highest bits). The greedy preview is
# ~1e-3 to 1e-2 off; the LP relaxation bound is ~1e-3 above the integer optimum on SDXL-Turbo.
MIP_GAP = 5e-4
TIME_LIMIT_S = 20.0  # a guard only; a solution stopped by it is reported as such, never silently
SOLVERS: tuple[str, ...] = ("cbc", "highs")
CBC_OPTIONS: tuple[str, ...] = ("preprocess off",)  # see the module docstring: CBC's preprocessing is unsound here


def make_solver(name: str) -> pulp.LpSolver:
    """The PuLP solver for ``name``, silent, with the gap and time guard above."""
    options = {"msg": False, "gapAbs": MIP_GAP, "gapRel": 0.0, "timeLimit": TIME_LIMIT_S}
    if name == "cbc":  # the CBC binary bundled with PuLP (its PULP_CBC_CMD wrapper is deprecated in 3.3)
        return pulp.COIN_CMD(path=pulp.PULP_CBC_CMD.pulp_cbc_path, options=list(CBC_OPTIONS), **options)
    if name == "highs":
        return pulp.HiGHS(**options)
    raise ValueError(f"unknown exact solver {name!r}; choose one of {list(SOLVERS)}.")


class ExactGroupSolver:
    """One group's integer program, built once and re-solved for each target."""

    def __init__(self, matrix: GroupMatrix) -> None:
        self.matrix = matrix
        n, m = matrix.values.shape
        weights = matrix.sizes / matrix.sizes.sum()  # makes the band row read in average bits
        span = matrix.values[:, -1].sum() - matrix.values[:, 0].sum()
        gain = (matrix.values - matrix.values[:, :1]) / (span if span > 0 else 1.0)
        self.problem = pulp.LpProblem(f"mixdq_{matrix.target}_{matrix.group}", pulp.LpMaximize)
        self.choice = [[self.problem.add_variable(f"c_{i}_{j}", cat=pulp.LpBinary) for j in range(m)] for i in range(n)]
        self.problem += pulp.lpSum(gain[i, j] * self.choice[i][j] for i in range(n) for j in range(m))
        for i in range(n):
            self.problem += pulp.lpSum(self.choice[i]) == 1, f"one_bit_{i}"
        bits = [pulp.lpSum(b * c for b, c in zip(matrix.bits, self.choice[i])) for i in range(n)]
        for a, b in dominance_pairs(matrix):
            self.problem += bits[a] >= bits[b], f"order_{a}_{b}"
        average = pulp.lpSum(weights[i] * bits[i] for i in range(n))
        self.problem += average >= 0, "band_low"
        self.problem += average <= 0, "band_high"
        self._lock = threading.Lock()  # one model, re-solved in place: one solve at a time (studio users share it)

    def solve(self, target: float, band: float, solver: str) -> tuple[np.ndarray | None, str]:
        """(bit index per layer, or ``None`` if there is no solution; status) for ``target ± band``."""
        with self._lock:
            self.problem.get_constraint_by_name("band_low").changeRHS(target - band)
            self.problem.get_constraint_by_name("band_high").changeRHS(target + band)
            status = self.problem.solve(make_solver(solver))
            if status != pulp.LpStatusOptimal or self.problem.sol_status not in _FOUND:
                return None, pulp.LpStatus[status]
            picked = np.array([[v.varValue or 0.0 for v in row] for row in self.choice])
        return picked.argmax(axis=1), _FOUND[self.problem.sol_status]


_FOUND = {
    pulp.LpSolutionOptimal: "Optimal",
    pulp.LpSolutionIntegerFeasible: f"Feasible (stopped at the {TIME_LIMIT_S:g} s time limit)",
}


def dominance_pairs(matrix: GroupMatrix) -> list[tuple[int, int]]:
    """Pairs ``(a, b)`` of same-size layers where ``a`` gains at least as much as ``b`` from every upgrade.

    Within each size, layers are ordered by their total gain and each is paired with the next when
    the dominance holds, so the constraints form chains and stay few.
    """
    m = len(matrix.bits)
    upper = np.triu_indices(m, k=1)
    gains = (matrix.values[:, None, :] - matrix.values[:, :, None])[:, upper[0], upper[1]]  # S[to] − S[from]
    pairs = []
    for size in np.unique(matrix.sizes):
        members = np.flatnonzero(matrix.sizes == size)
        members = members[np.argsort(-(matrix.values[members, -1] - matrix.values[members, 0]), kind="stable")]
        pairs += [(a, b) for a, b in itertools.pairwise(members) if np.all(gains[a] >= gains[b])]
    return pairs
