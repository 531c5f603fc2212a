"""Bit allocation on small hand-made tables: optimum, ties, infeasibility, input validation."""

import numpy as np
import pandas as pd
import pytest

from mixdq.allocate import Allocator, InfeasibleBudgetError, candidate_bits, group_targets
from mixdq.allocate.exact import SOLVERS
from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.sensitivity.table import SensitivityTableError, select_protected, validate_table

ALL_METHODS = (*SOLVERS, "approx")


def weight_table(layers: dict[str, tuple[str, float, list[float]]]) -> pd.DataFrame:
    """A weight-only table: ``{name: (group, size, values at the group's candidate bits)}``."""
    rows = []
    for name, (group, size, values) in layers.items():
        metric = "ssim" if group == "content" else "sqnr"
        for bit, value in zip(candidate_bits("weight", group), values, strict=True):
            rows.append((name, group, "linear", "mid", size, bit, "weight", metric, value))
    return pd.DataFrame(rows, columns=["layer", "group", "kind", "block", "size", "bit", "target", "metric", "value"])


# Hand-solvable: content c1, c2 (size 1 each, bits {2,4,8}), quality q1, q2 (size 1), q3 (size 2).
# At content target 5 the only sums of 10 bits are (2, 8) and (8, 2): 0.50 + 0.95 < 0.90 + 0.60, so c1=8, c2=2.
# At quality target 6 (24 bit·size): upgrade q3 (+30) or q1 and q2 (+20 +15 = +35): q1=q2=8, q3=4.
HAND = {
    "c1": ("content", 1.0, [0.50, 0.80, 0.90]),
    "c2": ("content", 1.0, [0.60, 0.70, 0.95]),
    "q1": ("quality", 1.0, [10.0, 30.0]),
    "q2": ("quality", 1.0, [10.0, 25.0]),
    "q3": ("quality", 2.0, [10.0, 40.0]),
}
HAND_K = 5 / 6  # content 5, quality 6
HAND_BUDGET = (5 * 2 + 6 * 4) / 6  # size-weighted: r = 2 / 4


def test_candidates_come_from_the_config_constants():
    assert candidate_bits("weight", "content") == WEIGHT_BITS
    assert candidate_bits("weight", "quality") == tuple(b for b in WEIGHT_BITS if b >= 4)
    assert candidate_bits("act", "content") == candidate_bits("act", "quality") == ACT_BITS
    with pytest.raises(ValueError, match="'bias'.*'weight', 'act'"):
        candidate_bits("bias", "content")


def test_group_targets_keep_the_average():
    targets = group_targets(4.0, 0.6, 2.0)
    assert targets["content"] == pytest.approx(0.6 * targets["quality"])
    assert (2.0 * targets["content"] + targets["quality"]) / 3.0 == pytest.approx(4.0)


@pytest.mark.parametrize("solver", ALL_METHODS)
def test_hand_solvable_optimum(solver):
    side = Allocator(weight_table(HAND)).allocate_side("weight", HAND_BUDGET, k=HAND_K, solver=solver)
    assert side.groups["content"].target == pytest.approx(5.0)
    assert side.groups["quality"].target == pytest.approx(6.0)
    assert side.bits == {"c1": 8, "c2": 2, "q1": 8, "q2": 8, "q3": 4}
    assert side.groups["quality"].objective == pytest.approx(30 + 25 + 10)
    assert side.solver == solver and side.status == ("Greedy" if solver == "approx" else "Optimal")


@pytest.mark.parametrize("solver", SOLVERS)
def test_budget_in_a_gap_between_reachable_averages_is_infeasible(solver):
    # quality averages reachable with sizes 1, 1, 2 at {4, 8}: 4, 5, 6, 7, 8; 4.5 ± 0.02 hits none
    allocator = Allocator(weight_table(HAND))
    budget = (3.0 * 2 + 4.5 * 4) / 6  # content 3, quality 4.5
    with pytest.raises(InfeasibleBudgetError, match=r"found no quality allocation.*feasible budgets at K=0\.6667"):
        allocator.allocate_side("weight", budget, k=3 / 4.5, solver=solver)


@pytest.mark.parametrize("budget", [1.5, 9.0])
def test_out_of_range_budget_names_the_feasible_range(budget):
    allocator = Allocator(weight_table(HAND))
    low, high = allocator.feasible_range("weight")
    assert (low, high) == pytest.approx(((2 * 2 + 4 * 4) / 6, 8.0))
    with pytest.raises(InfeasibleBudgetError, match=rf"budget {budget:.4f}.*{low:.4f} to {high:.4f} bits") as info:
        allocator.allocate_side("weight", budget)
    assert isinstance(info.value, ValueError) and (info.value.low, info.value.high) == pytest.approx((low, high))


def test_fixed_k_outside_the_groups_bits_is_rejected():
    with pytest.raises(InfeasibleBudgetError, match="at K=3"):
        Allocator(weight_table(HAND)).allocate_side("weight", 5.0, k=3.0)
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        Allocator(weight_table(HAND)).allocate_side("weight", 5.0, k=-1.0)


@pytest.mark.parametrize("k", [3.0, 0.1])
def test_a_k_that_admits_no_budget_names_the_k_range_and_the_any_k_range_low_to_high(k):
    # content bits {2,4,8} over quality bits {4,8}: K in 2/8 to 8/4; at K=3 no budget is feasible, and the
    # range "at K=3" would read high to low (6.6667 to 4.4444), so the message gives the any-K range instead
    allocator = Allocator(weight_table(HAND))
    assert allocator.k_range("weight") == pytest.approx((0.25, 2.0))
    with pytest.raises(
        InfeasibleBudgetError, match=rf"at K={k:g} \(K = b_content / b_quality must lie within 0\.25 to 2 "
    ) as info:
        allocator.allocate_side("weight", 5.0, k=k)
    assert "feasible budgets at any K: 3.3333 to 8.0000 bits" in str(info.value)
    assert (info.value.low, info.value.high) == pytest.approx((10 / 3, 8.0))
    with pytest.raises(InfeasibleBudgetError, match=rf"every weight budget is infeasible at K={k:g}"):
        allocator.feasible_range("weight", k)
    assert allocator.feasible_range("weight", 2.0) == pytest.approx((16 / 3, 16 / 3))  # the edge: content 8, quality 4


@pytest.mark.parametrize("solver", ALL_METHODS)
def test_ties_give_a_valid_deterministic_answer(solver):
    # two identical quality layers, budget for exactly one upgrade: either is optimal
    table = weight_table(
        {
            "c1": ("content", 1.0, [0.5, 0.7, 0.9]),
            "qa": ("quality", 1.0, [20.0, 40.0]),
            "qb": ("quality", 1.0, [20.0, 40.0]),
        }
    )
    allocator = Allocator(table)
    budget = (4.0 * 1 + 6.0 * 2) / 3  # content 4, quality 6
    first = allocator.allocate_side("weight", budget, k=4 / 6, solver=solver)
    again = allocator.allocate_side("weight", budget, k=4 / 6, solver=solver)
    assert sorted((first.bits["qa"], first.bits["qb"])) == [4, 8]
    assert first.bits == again.bits
    assert first.groups["quality"].objective == pytest.approx(60.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sensitivities_are_rejected_with_the_layer(bad):
    table = weight_table(HAND)
    table.loc[(table["layer"] == "q2") & (table["bit"] == 8), "value"] = bad
    with pytest.raises(SensitivityTableError, match=r"layer 'q2' \(weight sqnr at 8 bits\).*finite"):
        Allocator(table)


def test_table_validation_names_bad_columns_and_values():
    table = weight_table(HAND)
    with pytest.raises(SensitivityTableError, match=r"lacks columns \['value'\]"):
        validate_table(table.drop(columns="value"))
    wrong = table.copy()
    wrong.loc[0, "metric"] = "psnr"
    with pytest.raises(SensitivityTableError, match=r"layer 'c1': metric 'psnr' is not one of \['sqnr', 'ssim'\]"):
        validate_table(wrong)
    with pytest.raises(SensitivityTableError, match="layer 'c1' lacks weight ssim values"):
        Allocator(table.loc[~((table["layer"] == "c1") & (table["bit"] == 4))]).allocate_side("weight", 5.0)
    with pytest.raises(SensitivityTableError, match="has two rows"):
        validate_table(pd.concat([table, table.iloc[:1]]))


def test_protected_layers_are_excluded_and_counted_at_16_bits():
    table = weight_table(HAND)
    act = table.assign(target="act")
    act = act.loc[act["bit"] >= 4].copy()
    act.loc[act["layer"] == "q3", "value"] = 1.0  # the worst activation SQNR
    table = pd.concat([table, act], ignore_index=True)
    # per group, ceil(share · layers) lowest act values at 8 bits: content by SSIM, quality by SQNR
    assert select_protected(table, share=0.34) == ["c1", "q3", "q2"]
    assert select_protected(table, share=0.3) == ["c1", "q3"]
    assert select_protected(table, share=0.0) == []
    allocator = Allocator(table, protected=["q3"])
    side = allocator.allocate_side("weight", (2 * 5 + 2 * 6 + 2 * 16) / 6, k=5 / 6)
    assert "q3" not in side.bits
    assert side.average_bits == pytest.approx(
        (2 * side.groups["content"].average + 2 * side.groups["quality"].average + 32) / 6
    )


@pytest.mark.parametrize("solver", ALL_METHODS)
def test_the_top_of_the_range_puts_every_layer_at_its_highest_bits(solver):
    # c2 and q2 score the same at 4 and 8 bits (a flat or saturated metric): inside the ±band a solver could
    # leave them at 4, but asking for the highest average ("A8") must mean every layer at 8.
    table = weight_table(
        {
            "c1": ("content", 10.0, [0.5, 0.8, 0.9]),
            "c2": ("content", 0.1, [0.9, 0.9, 0.9]),
            "q1": ("quality", 10.0, [10.0, 30.0]),
            "q2": ("quality", 0.1, [20.0, 20.0]),
        }
    )
    allocator = Allocator(table, band=0.2)
    assert allocator.feasible_range("weight")[1] == pytest.approx(8.0)
    side = allocator.allocate_side("weight", 8.0, solver=solver)
    assert side.bits == {"c1": 8, "c2": 8, "q1": 8, "q2": 8} and side.average_bits == pytest.approx(8.0)
