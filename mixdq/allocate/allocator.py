"""Budget -> PrecisionConfig: MixDQ's per-group integer programs tied together.

A weight budget is the size-weighted average bits over *all* quantizable layers, protected layers
counted at 16 (the quantity :func:`mixdq.memory.average_weight_bits` reports, so bits map to memory),
met within ± the band, or a cap on the MB of the whole UNet. ``protected_weights`` changes what the bits
count: "outside" averages over the non-protected layers only (their FP16 weights still cost memory), and
"act_only" is MixDQ's own search: protected layers' weights are allocated like any other, only their
activations stay FP16. With the default ("inside") an 8.00 budget cannot keep every layer at 8 bits; the
result then says so (:class:`BelowUniformWidthWarning`). An activation budget is the average over
the non-protected layers only: activations cost no memory, and "A8" must mean every allocated layer at
8 bits, not 8 on average with the FP16 protected layers lifting it. Each budget is turned into a target
for the non-protected layers, split into a content and a quality target with ratio K (fixed, or
"auto": the best K on a grid), and each group is solved on its own. :class:`Allocator` keeps the
per-group models between calls, so the studio can re-solve on every slider release without rebuilding them.

Each group is scored by MixDQ's decoupled metric (:data:`GROUP_METRIC`: content by image SSIM, quality by
UNet-output SQNR) unless ``metrics`` says otherwise: ``metrics={"content": "sqnr", "quality": "sqnr"}`` is
the paper's single-metric ablation, and needs a table with SQNR rows for content layers.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mixdq.allocate.approx import ApproxGroupSolver
from mixdq.allocate.budget import WeightBudgetScale
from mixdq.allocate.exact import SOLVERS, ExactGroupSolver
from mixdq.allocate.groups import (
    GroupSolution,
    allocation_score,
    candidate_bits,
    group_targets,
    normalized_objective,
)
from mixdq.config import BUDGET_KEY, Budget, PrecisionConfig
from mixdq.inventory import UNetInventory, inventory_fingerprint
from mixdq.memory import FP16_BITS, MB, weight_memory
from mixdq.sensitivity.table import (
    GROUP_METRIC,
    GROUPS,
    METRICS,
    TARGETS,
    GroupMatrix,
    SensitivityTableError,
    check_table_matches,
    group_matrix,
    validate_table,
)

BAND = 0.02  # MixDQ's tolerance on each group's average bits
APPROX = "approx"
METHODS: tuple[str, ...] = (*SOLVERS, APPROX)
K_GRID_POINTS = 25
AUTO = "auto"
# What a weight budget in bits charges for the protected layers' weights (see the module docstring).
INSIDE, OUTSIDE, ACT_ONLY = "inside", "outside", "act_only"
PROTECTED_WEIGHTS: tuple[str, ...] = (INSIDE, OUTSIDE, ACT_ONLY)


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budget; ``low``/``high`` give the feasible range in average bits."""

    def __init__(self, message: str, low: float, high: float) -> None:
        super().__init__(message)
        self.low, self.high = low, high


class BelowUniformWidthWarning(UserWarning):
    """A bits budget at a uniform width (e.g. 8.00) that only an allocation with layers below that width meets,
    because the protected layers' FP16 weights are charged to it."""


@dataclass(frozen=True)
class BelowUniform:
    """Why and how far an allocation fell below the uniform width its budget names."""

    width: int  # the uniform width the budget reaches, e.g. 8
    layers: int  # allocated layers below it
    total: int  # allocated (non-protected) layers
    lowest_bit: int
    allocated_bits: float  # the average the budget leaves for the allocated layers
    message: str  # one line, naming the options that let a uniform config fit


@dataclass(frozen=True)
class SideAllocation:
    """The allocation of one side (weights or activations) of every layer."""

    target: str  # "weight" | "act"
    budget_bits: float  # requested average (weights: see Allocator's protected_weights; acts: non-protected only)
    average_bits: float  # achieved average, same convention
    overall_bits: float  # achieved average over every layer, FP16 ones at 16 bits (weights: what memory costs)
    allocated_bits: float  # achieved average over the allocated layers only
    k: float  # b_content / b_quality used
    groups: dict[str, GroupSolution]
    solver: str  # "cbc" | "highs" | "approx": the one that produced these bits
    status: str  # "Optimal" (within MIP_GAP), "Greedy", or why the exact solver stopped early
    seconds: float  # wall time of this side's allocation, K search included

    @property
    def bits(self) -> dict[str, int]:
        return {name: bit for g in GROUPS for name, bit in self.groups[g].bits.items()}

    @property
    def score(self) -> float:
        """Size-weighted normalized objective in [0, 1]: what "best K" maximizes."""
        return allocation_score(
            {g: s.normalized for g, s in self.groups.items()}, {g: s.share for g, s in self.groups.items()}
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for the config's metadata."""
        return {
            "budget_bits": self.budget_bits,
            "average_bits": self.average_bits,
            "overall_bits": self.overall_bits,
            "allocated_bits": self.allocated_bits,
            "k": self.k,
            "solver": self.solver,
            "status": self.status,
            "solve_seconds": self.seconds,
            "groups": {
                g.group: {
                    "target": g.target,
                    "average": g.average,
                    "objective": g.objective,
                    "normalized": g.normalized,
                }
                for g in self.groups.values()
            },
        }


@dataclass(frozen=True)
class AllocationResult:
    """A precision config and how it was obtained."""

    config: PrecisionConfig
    weight: SideAllocation
    act: SideAllocation | None  # None: activations stay FP16
    weight_mb: float | None  # exact UNet weight MB; None without a layer inventory
    below_uniform: BelowUniform | None = None  # set when a bits budget at a uniform width put layers below it

    @property
    def objective(self) -> float:
        """Sum of the sides' scores (each in [0, 1]; 1 = all layers at their highest bits)."""
        return self.weight.score + (self.act.score if self.act is not None else 0.0)


class _Side:
    """Per-target data: group matrices, size bookkeeping and lazily built solvers."""

    def __init__(
        self, table: pd.DataFrame, target: str, fp16: frozenset[str], counted: bool, metrics: Mapping[str, str]
    ) -> None:
        self.target = target
        self.matrices: dict[str, GroupMatrix] = {
            g: group_matrix(table, target, g, candidate_bits(target, g), exclude=fp16, metric=metrics[g])
            for g in GROUPS
        }
        empty = [g for g, m in self.matrices.items() if not len(m.layers)]
        if empty:
            raise SensitivityTableError(f"no {target} layers in group(s) {empty}; MixDQ allocates both groups.")
        sizes = table.loc[table["target"] == target].drop_duplicates("layer").set_index("layer")["size"]
        self.total_size = float(sizes.sum())
        # The ``fp16`` layers stay out of the programs; a budget counts them at 16 bits only where ``counted``.
        self.protected_size = float(sizes.reindex(sorted(fp16)).fillna(0.0).sum())
        self.counted = counted
        self.group_size = {g: float(m.sizes.sum()) for g, m in self.matrices.items()}
        self.r = self.group_size["content"] / self.group_size["quality"]
        self.share = {g: s / sum(self.group_size.values()) for g, s in self.group_size.items()}
        self.low = {g: float(min(m.bits)) for g, m in self.matrices.items()}
        self.high = {g: float(max(m.bits)) for g, m in self.matrices.items()}
        self._exact: dict[str, ExactGroupSolver] = {}
        self._approx: dict[str, ApproxGroupSolver] = {}

    def to_allocated(self, budget: float) -> float:
        """Average over the allocated layers that gives ``budget`` (the identity where FP16 layers are not counted)."""
        return self.from_overall(budget) if self.counted else budget

    def to_budget(self, allocated: float) -> float:
        """The budget (counted as this side's budgets are) whose allocated layers average ``allocated``."""
        return self.to_overall(allocated) if self.counted else allocated

    def from_overall(self, overall: float) -> float:
        """Average over the allocated layers that gives ``overall`` over every layer, FP16 ones at 16 bits."""
        return (overall * self.total_size - FP16_BITS * self.protected_size) / (self.total_size - self.protected_size)

    def to_overall(self, allocated: float) -> float:
        return (allocated * (self.total_size - self.protected_size) + FP16_BITS * self.protected_size) / self.total_size

    def allocated_range(self, k: float | None) -> tuple[float, float]:
        """Allocated-average budgets whose group targets lie within each group's bits (any K, or this K)."""
        if k is None:
            return sum(self.share[g] * self.low[g] for g in GROUPS), sum(self.share[g] * self.high[g] for g in GROUPS)
        factor = group_targets(1.0, k, self.r)  # group targets are proportional to the budget
        return max(self.low[g] / factor[g] for g in GROUPS), min(self.high[g] / factor[g] for g in GROUPS)

    def k_grid(self, allocated: float, points: int = K_GRID_POINTS) -> np.ndarray:
        """K values evenly spaced in content target over the range where both group targets are feasible."""
        total = allocated * (1 + self.r)  # = b_c·r + b_q
        content_low = max(self.low["content"], (total - self.high["quality"]) / self.r)
        content_high = min(self.high["content"], (total - self.low["quality"]) / self.r)
        content = np.linspace(content_low, content_high, points)
        return content / (total - self.r * content)

    def solve_group(self, group: str, target: float, band: float, solver: str) -> tuple[np.ndarray | None, str]:
        if target >= self.high[group] - 1e-9:
            # The top of the range means every layer at its highest bits ("A8" = all at 8). Solvers would also
            # accept a layer whose metric ties at two bits sitting lower, as long as the band absorbs it.
            return np.full(len(self.matrices[group].layers), len(self.matrices[group].bits) - 1), (
                "Greedy" if solver == APPROX else "Optimal"
            )
        if solver == APPROX:
            if group not in self._approx:
                self._approx[group] = ApproxGroupSolver(self.matrices[group])
            choice = self._approx[group].solve(target, band)
            return choice, "Greedy" if choice is not None else "Greedy missed the band"
        if group not in self._exact:
            self._exact[group] = ExactGroupSolver(self.matrices[group])
        return self._exact[group].solve(target, band, solver)

    def solution(self, group: str, target: float, choice: np.ndarray) -> GroupSolution:
        matrix = self.matrices[group]
        bits = np.asarray(matrix.bits)[choice]
        raw, normalized = normalized_objective(matrix.values, choice)
        return GroupSolution(
            group=group,
            bits=dict(zip(matrix.layers, bits.tolist(), strict=True)),
            target=target,
            average=float(np.dot(matrix.sizes, bits) / matrix.sizes.sum()),
            objective=raw,
            normalized=normalized,
            share=self.share[group],
        )


class Allocator:
    """MixDQ bit allocation over one sensitivity table, with its solvers cached between calls.

    ``protected`` layers keep FP16 activations and are excluded from the programs. ``protected_weights``
    says what happens to their weights: "inside" (FP16, counted at 16 bits in a bits budget), "outside"
    (FP16, not counted: the budget averages over the other layers) or "act_only" (MixDQ's: allocated like
    any other layer's). With ``inventory`` (the model's layers), budgets may be given in MB and results carry
    exact MB. ``metrics`` maps each group to the metric that scores it (default MixDQ's :data:`GROUP_METRIC`).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        protected: Sequence[str] = (),
        inventory: UNetInventory | None = None,
        band: float = BAND,
        model_id: str = "",
        metrics: Mapping[str, str] = GROUP_METRIC,
        protected_weights: str = INSIDE,
    ) -> None:
        if protected_weights not in PROTECTED_WEIGHTS:
            raise ValueError(
                f"protected_weights {protected_weights!r} is not one of {list(PROTECTED_WEIGHTS)} (inside: FP16 and "
                "counted in the budget; outside: FP16, not counted; act_only: quantized, only activations FP16)."
            )
        self.table = validate_table(table)
        if set(metrics) != set(GROUPS) or not set(metrics.values()) <= set(METRICS):
            raise ValueError(
                f"metrics {dict(metrics)!r} must map each of the groups {list(GROUPS)} to one of {list(METRICS)}, "
                f"e.g. MixDQ's {GROUP_METRIC!r}."
            )
        self.metrics = dict(metrics)
        known = set(self.table["layer"])
        unknown = [name for name in protected if name not in known]
        if unknown:
            raise SensitivityTableError(f"protected layers {unknown[:3]} are not in the sensitivity table.")
        if not 0 < band < 1:
            raise ValueError(f"band {band!r} must be in (0, 1) average bits; MixDQ uses {BAND}.")
        self.protected = tuple(protected)
        self.protected_weights = protected_weights
        # The layers whose weights stay FP16 (all of them but for act_only).
        self.fp16_weights = () if protected_weights == ACT_ONLY else self.protected
        self.inventory = inventory
        self.band = band
        self.model_id = model_id
        self.scale = None
        if inventory is not None:
            check_table_matches(self.table, inventory.layers)
            self.scale = WeightBudgetScale(inventory.layers, inventory.other_params, set(self.fp16_weights))
        self._sides: dict[str, _Side] = {}
        self._solved: dict[tuple, SideAllocation] = {}  # results are immutable: a slider revisiting a budget is free

    def side(self, target: str) -> _Side:
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {list(TARGETS)}.")
        if target not in self._sides:
            fp16 = self.fp16_weights if target == "weight" else self.protected
            counted = target == "weight" and self.protected_weights == INSIDE
            self._sides[target] = _Side(self.table, target, frozenset(fp16), counted, self.metrics)
        return self._sides[target]

    def bits_to_mb(self, bits: float) -> float:
        """UNet weight MB (all parameters, 1 MB = 1e6 bytes) at a weight budget of ``bits`` average bits, counted
        as this allocator's ``protected_weights`` says: the one conversion the CLI and the studio use."""
        side = self.side("weight")
        return self._scale().mb(side.to_overall(side.to_allocated(bits)))

    def mb_to_bits(self, mb: float) -> float:
        """The weight budget in average bits (this allocator's convention) whose UNet weights take ``mb`` MB."""
        side = self.side("weight")
        return side.to_budget(side.from_overall(self._scale().bits(mb)))

    def _scale(self) -> WeightBudgetScale:
        if self.scale is None:
            raise ValueError("a MB budget needs the model's layer inventory; pass inventory= to Allocator.")
        return self.scale

    def feasible_range(self, target: str = "weight", k: float | str = AUTO) -> tuple[float, float]:
        """(lowest, highest) average bits this allocator can reach for ``target`` at ``k``, counted as its
        budgets are (weights: see ``protected_weights``).

        Raises :class:`InfeasibleBudgetError` for a fixed ``k`` outside :meth:`k_range`, where no budget is feasible.
        """
        side = self.side(target)
        fixed_k = None if k == AUTO else _check_k(k)
        if fixed_k is not None and not self._k_reachable(target, fixed_k):
            raise self._infeasible(target, None, fixed_k, "")
        low, high = side.allocated_range(fixed_k)
        return side.to_budget(low), side.to_budget(high)

    def k_range(self, target: str = "weight") -> tuple[float, float]:
        """(lowest, highest) K = b_content / b_quality at which some ``target`` budget is feasible:
        both group targets must lie within their groups' bits, e.g. weights 2/8 to 8/4."""
        side = self.side(target)
        return side.low["content"] / side.high["quality"], side.high["content"] / side.low["quality"]

    def _k_reachable(self, target: str, k: float) -> bool:
        low, high = self.k_range(target)
        return low * (1 - 1e-12) <= k <= high * (1 + 1e-12)

    def k_grid(self, target: str, budget_bits: float, points: int = K_GRID_POINTS) -> list[float]:
        """``points`` K values spread evenly in content target over the range where both groups can meet
        ``budget_bits``: what ``k="auto"`` ranks, and the candidates :func:`mixdq.evaluate.select_k` tries.
        Duplicates (a budget every K meets the same way, e.g. all layers at the highest bits) collapse."""
        side = self.side(target)
        allocated = side.to_allocated(budget_bits)
        low, high = side.allocated_range(None)
        if not low - 1e-9 <= allocated <= high + 1e-9:
            raise self._infeasible(target, budget_bits, None, "outside the reachable range")
        grid = side.k_grid(allocated, points)
        return sorted({round(float(k), 12) for k in grid if np.isfinite(k) and k > 0})

    def allocate_side(
        self, target: str, budget_bits: float, k: float | str = AUTO, solver: str = "cbc"
    ) -> SideAllocation:
        """Allocate ``target`` (weights or activations) at ``budget_bits`` overall average bits.

        ``k="auto"`` ranks K on a grid by the size-weighted normalized group objectives, using the
        approximate solver (milliseconds per K), then solves the winner with ``solver``. The
        criterion is :func:`mixdq.allocate.groups.allocation_score`: fast enough for a slider, but it sees
        layers one at a time, so a group whose metric is nearly flat looks cheap and is starved;
        :func:`mixdq.evaluate.select_k` chooses K by generating images instead (MixDQ's last search step).
        """
        if solver not in METHODS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {list(METHODS)}.")
        key = self._key(target, budget_bits, k, solver)
        if key not in self._solved:
            self._solved[key] = self._allocate_side(target, budget_bits, k, solver)
        return self._solved[key]

    def is_solved(self, target: str, budget_bits: float, k: float | str = AUTO, solver: str = "cbc") -> bool:
        """Whether this side allocation is already in the cache (answered without solving)."""
        return self._key(target, budget_bits, k, solver) in self._solved

    @staticmethod
    def _key(target: str, budget_bits: float, k: float | str, solver: str) -> tuple:
        return (target, round(float(budget_bits), 9), k, solver)

    def _allocate_side(self, target: str, budget_bits: float, k: float | str, solver: str) -> SideAllocation:
        start = time.perf_counter()
        side = self.side(target)
        allocated = side.to_allocated(budget_bits)
        fixed_k = None if k == AUTO else _check_k(k)
        low, high = side.allocated_range(fixed_k)
        if not low - 1e-9 <= allocated <= high + 1e-9:
            raise self._infeasible(target, budget_bits, fixed_k, "outside the reachable range")
        if fixed_k is None:
            fixed_k = self._best_k(side, allocated, solver)
        targets = group_targets(allocated, fixed_k, side.r)
        groups, statuses = {}, []
        # The exact solvers run as subprocesses: solving the two groups side by side halves the wait.
        with ThreadPoolExecutor(max_workers=len(GROUPS)) as pool:
            solved = dict(zip(GROUPS, pool.map(lambda g: side.solve_group(g, targets[g], self.band, solver), GROUPS)))
        for group in GROUPS:
            choice, status = solved[group]
            if choice is None:
                raise self._infeasible(target, budget_bits, fixed_k, f"{solver} found no {group} allocation: {status}")
            groups[group] = side.solution(group, targets[group], choice)
            statuses.append(status)
        allocated_average = sum(groups[g].average * side.group_size[g] for g in GROUPS) / sum(side.group_size.values())
        return SideAllocation(
            target=target,
            budget_bits=budget_bits,
            average_bits=side.to_budget(allocated_average),
            overall_bits=side.to_overall(allocated_average),
            allocated_bits=allocated_average,
            k=fixed_k,
            groups=groups,
            solver=solver,
            status=next((s for s in statuses if s != "Optimal"), "Optimal"),
            seconds=time.perf_counter() - start,
        )

    def _best_k(self, side: _Side, allocated: float, solver: str) -> float:
        """The grid K with the highest allocation score (approximate ranking; if the greedy misses
        the band at every K, the ranking uses ``solver`` itself)."""
        grid = side.k_grid(allocated)
        for ranking in dict.fromkeys((APPROX, solver)):
            scores = [self._k_score(side, allocated, k, ranking) for k in grid]
            if any(s is not None for s in scores):
                return float(grid[int(np.argmax([-np.inf if s is None else s for s in scores]))])
        raise self._infeasible(side.target, side.to_budget(allocated), None, "no K on the grid lands in the band")

    def _k_score(self, side: _Side, allocated: float, k: float, solver: str) -> float | None:
        targets = group_targets(allocated, k, side.r)
        normalized = {}
        for group in GROUPS:
            choice, _ = side.solve_group(group, targets[group], self.band, solver)
            if choice is None:
                return None
            normalized[group] = normalized_objective(side.matrices[group].values, choice)[1]
        return allocation_score(normalized, side.share)

    def _infeasible(self, target: str, budget_bits: float | None, k: float | None, why: str) -> InfeasibleBudgetError:
        """The error for ``budget_bits`` (``None``: any budget) at ``k`` (``None``: auto), with the feasible
        range low to high: at ``k``, or at any K when ``k`` itself admits no budget."""
        at_k = f" at K={k:.4g}" if k is not None else ""
        budget = (
            f"{target} budget {budget_bits:.4f} average bits" if budget_bits is not None else f"every {target} budget"
        )
        range_at = at_k
        if k is not None and not self._k_reachable(target, k):
            k_low, k_high = self.k_range(target)
            why = f"K = b_content / b_quality must lie within {k_low:.4g} to {k_high:.4g} for {target} budgets"
            range_at, k = " at any K", None
        low, high = self.feasible_range(target, AUTO if k is None else k)
        message = f"{budget} is infeasible{at_k} ({why}); feasible budgets{range_at}: {low:.4f} to {high:.4f} bits"
        if target == "weight" and self.scale is not None:
            message += f" ({self.bits_to_mb(low):.1f} to {self.bits_to_mb(high):.1f} MB of UNet weights)"
        message += f", with {len(self.protected)} protected layers {self._protected_text(target)}."
        return InfeasibleBudgetError(message, low, high)

    def _protected_text(self, target: str) -> str:
        if target == "act":
            return "in FP16 not counted in the activation average"
        return {
            INSIDE: "in FP16 counted at 16 bits",
            OUTSIDE: "in FP16 not counted in the weight average",
            ACT_ONLY: "whose weights are allocated like the others (activations FP16)",
        }[self.protected_weights]

    def below_uniform(self, weight: SideAllocation) -> BelowUniform | None:
        """Whether ``weight`` (a bits budget) asks for a uniform width that charging the protected layers' FP16
        weights to it keeps out of reach, and the allocation has layers below that width.

        It fires where the budget is at or just above (within the band) the widest width every group offers (8.00
        bits with ``protected_weights="inside"``): a user asking for "W8" means every layer at 8, and only the
        protected layers' charge pushes some below it. Lower widths (4.00) say nothing: there layers below the
        width are mixed precision's own trade (2 and 8 bits mixed by choice), as are other budgets, MB caps, and
        every budget under "outside" or "act_only".
        """
        side = self.side("weight")
        width = max(set.intersection(*(set(side.matrices[g].bits) for g in GROUPS)))
        requested = weight.budget_bits
        if not width - 1e-9 <= requested <= width + self.band:
            return None
        allocated = side.to_allocated(requested)
        below = [bit for bit in weight.bits.values() if bit < width]
        if allocated >= width - 1e-9 or not below:
            return None
        total = len(weight.bits)
        message = (
            f"weight budget {weight.budget_bits:.2f} bits counts the {len(self.protected)} protected layers' FP16 "
            f"weights at 16 bits, leaving {allocated:.3f} average bits for the other {total} layers: {len(below)} "
            f"of them are below {width} bits (lowest {min(below)}). For a budget a uniform {width}-bit config meets, "
            "use protected_weights='outside' (protected FP16 weights not charged to it) or 'act_only' (MixDQ's: "
            "protected layers' weights quantized too, only their activations FP16); CLI: --protected-weights "
            "outside or act_only."
        )
        return BelowUniform(width, len(below), total, min(below), allocated, message)

    def allocate(
        self,
        weight_bits: float | None = None,
        weight_mb: float | None = None,
        act_bits: float | None = 8.0,
        k: float | str = AUTO,
        act_k: float | str = AUTO,
        solver: str = "cbc",
        budget: Budget | None = None,
    ) -> AllocationResult:
        """Allocate weights (budget in average bits, MB or a :class:`Budget`: exactly one) and activations
        (``None``: FP16). The weight budget is recorded in the config's metadata.

        An average-bits budget is met within ± the band; a MB budget is a cap, never exceeded. ``act_bits``
        averages over the non-protected layers: 8.0 puts every one of them at 8 bits. A bits budget that puts
        layers below the uniform width it reaches warns (:class:`BelowUniformWidthWarning`) and sets
        ``below_uniform``.
        """
        budget = _one_budget(weight_bits, weight_mb, budget)
        below = None
        if budget.unit == "bits":
            weight = self.allocate_side("weight", budget.value, k, solver)
            below = self.below_uniform(weight)
        else:
            # A memory budget is a cap: aim one band (in the allocated layers' average) below it.
            side = self.side("weight")
            aim = side.to_budget(side.to_allocated(self.mb_to_bits(budget.value)) - self.band)
            try:
                weight = self.allocate_side("weight", aim, k, solver)
            except InfeasibleBudgetError as err:
                raise InfeasibleBudgetError(f"{budget.value:g} MB: {err}", err.low, err.high) from None
        act = self.allocate_side("act", act_bits, act_k, solver) if act_bits is not None else None
        act_only = self.protected_weights == ACT_ONLY
        config = PrecisionConfig(
            weight_bits=weight.bits,
            act_bits=act.bits if act is not None else {},
            protected=[] if act_only else list(self.protected),  # act_only: absent from act_bits, so FP16 inputs
            model_id=self.model_id,
        )
        mb = None
        if self.inventory is not None:
            layers = list(self.inventory.layers)
            config.validate(layers)
            config.fingerprint = inventory_fingerprint(layers)
            mb = weight_memory(layers, config, self.inventory.other_params).total_bytes / MB
        config.metadata[BUDGET_KEY] = budget.to_dict()
        config.metadata["allocation"] = {
            "band": self.band,
            "metrics": self.metrics,
            "protected_weights": self.protected_weights,
            "protected_layers": list(self.protected),
            "weight_mb": mb,
            "objective": weight.score + (act.score if act is not None else 0.0),
            "weight": weight.summary(),
            "act": act.summary() if act is not None else None,
            "below_uniform": below.message if below is not None else None,
        }
        if below is not None:
            warnings.warn(BelowUniformWidthWarning(below.message), stacklevel=2)
        return AllocationResult(config=config, weight=weight, act=act, weight_mb=mb, below_uniform=below)


def _one_budget(weight_bits: float | None, weight_mb: float | None, budget: Budget | None) -> Budget:
    given = [b for b in (weight_bits, weight_mb, budget) if b is not None]
    if len(given) != 1:
        raise ValueError("give exactly one weight budget: weight_bits (average bits), weight_mb (MB) or budget.")
    if budget is not None:
        return budget
    return Budget(float(weight_bits), "bits") if weight_bits is not None else Budget(float(weight_mb), "mb")


def _check_k(k: float | str) -> float:
    if isinstance(k, str) or not k > 0:
        raise ValueError(f"K = b_content / b_quality must be a positive number or {AUTO!r}, got {k!r}.")
    return float(k)
