"""Choosing K by generating images (MixDQ's last search step): candidates, ranking, and one end-to-end run."""

import json

import numpy as np
import pandas as pd
import pytest

from mixdq.allocate import AUTO, Allocator
from mixdq.allocate.groups import candidate_bits
from mixdq.evaluate import k_candidates, k_selection, select_k
from mixdq.inventory import layer_inventory
from mixdq.sensitivity.table import COLUMNS

PROMPTS = ["a red circle on the left", "a large blue square at the top", "a green triangle", "a small cyan circle"]


def synthetic_table(layers) -> pd.DataFrame:
    """A weight-and-activation table for ``layers``: sensitivity falls with fewer bits, more for later layers."""
    rows = []
    for index, info in enumerate(layers):
        metric = "ssim" if info.group == "content" else "sqnr"
        for target in ("weight", "act"):
            for bit in candidate_bits(target, info.group):
                damage = (1 + index % 7) / bit
                value = 1 - 0.01 * damage if metric == "ssim" else 60 - 10 * damage
                rows.append(
                    (info.name, info.group, info.kind, info.block, info.weight_numel, bit, target, metric, value)
                )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def hand_allocator() -> Allocator:
    """Four content and four quality layers of size 1: with a ±0.5-bit band every K on the grid is feasible."""
    rows = []
    for i in range(4):
        rows += [
            (f"c{i}", "content", "linear", "mid", 1.0, b, "weight", "ssim", 1 - (i + 1) * 0.01 / b) for b in (2, 4, 8)
        ]
        rows += [(f"q{i}", "quality", "linear", "mid", 1.0, b, "weight", "sqnr", 60 - (i + 1) * 10 / b) for b in (4, 8)]
    return Allocator(pd.DataFrame(rows, columns=list(COLUMNS)), band=0.5)


def test_candidates_span_the_feasible_range_and_include_auto():
    allocator = hand_allocator()
    ks = k_candidates(allocator, 5.0, count=4)
    auto = allocator.allocate_side("weight", 5.0, AUTO, "approx").k
    assert ks == sorted(ks) and any(np.isclose(k, auto) for k in ks)
    assert set(allocator.k_grid("weight", 5.0, 4)) <= set(ks) and len(ks) in (4, 5)
    for k in ks:  # every candidate is feasible at this budget
        assert abs(allocator.allocate_side("weight", 5.0, k).average_bits - 5.0) <= allocator.band
    with pytest.raises(ValueError, match="at least one K"):
        k_candidates(allocator, 5.0, count=0)


@pytest.mark.parametrize(("metric", "scores", "best"), [("psnr_db", [30.0, 35.0, 32.0], 1), ("fd", [0.3, 0.1, 0.1], 1)])
def test_the_best_scoring_k_wins_ties_to_the_smaller(monkeypatch, metric, scores, best):
    allocator = hand_allocator()
    ks = allocator.k_grid("weight", 5.0, 3)

    def fake_evaluate(pipe, configs, prompts, **kwargs):
        assert list(configs) == [f"K={k:.4f}" for k in ks] and kwargs == {"num_inference_steps": 4}
        return pd.DataFrame({"config": list(configs), metric: scores})

    monkeypatch.setattr(k_selection, "evaluate", fake_evaluate)
    chosen = select_k(None, allocator, 5.0, None, PROMPTS, ks=ks, metric=metric, num_inference_steps=4)
    assert chosen.k == ks[best] and chosen.metric == metric
    assert chosen.result.weight.k == ks[best]
    assert list(chosen.table["k"]) == ks and chosen.table["auto"].dtype == bool
    summary = chosen.result.config.metadata["allocation"]["k_selection"]
    assert summary["k"] == ks[best] and [c[metric] for c in summary["candidates"]] == scores
    json.dumps(summary)
    with pytest.raises(ValueError, match="'lpips' is not one of"):
        select_k(None, allocator, 5.0, None, PROMPTS, ks=ks, metric="lpips")


def test_select_k_end_to_end_on_the_random_pipeline(fresh_random_pipe, tmp_path):
    pipe = fresh_random_pipe
    layers = layer_inventory(pipe.unet)
    allocator = Allocator(synthetic_table(layers))
    ks = allocator.k_grid("weight", 4.0, 2)
    chosen = select_k(
        pipe,
        allocator,
        4.0,
        None,
        PROMPTS,
        ks=ks,
        metric="ssim",
        num_inference_steps=1,
        height=64,
        width=64,
        batch_size=4,
        progress=False,
        cache_dir=tmp_path,
    )
    table = chosen.table
    assert list(table["k"]) == ks and len(table) == 2
    assert chosen.k == ks[int(np.argmax(table["ssim"]))]
    assert (table["content_bits"].diff().dropna() > 0).all()  # a larger K gives content more bits
    assert all(abs(b - 4.0) <= 0.03 for b in table["avg_weight_bits"])
    assert (
        chosen.result.config.weight_bits
        == allocator.allocate(weight_bits=4.0, act_bits=None, k=chosen.k).config.weight_bits
    )


def test_identical_allocations_are_generated_once(monkeypatch):
    allocator = hand_allocator()
    ks = [0.5, 0.51, 0.875]  # 0.5 and 0.51 round to the same bits at this band
    assert allocator.allocate_side("weight", 5.0, 0.5).bits == allocator.allocate_side("weight", 5.0, 0.51).bits
    seen = []

    def fake_evaluate(pipe, configs, prompts, **kwargs):
        seen.append(list(configs))
        return pd.DataFrame({"config": list(configs), "ssim": [0.9, 0.95]})

    monkeypatch.setattr(k_selection, "evaluate", fake_evaluate)
    chosen = select_k(None, allocator, 5.0, None, PROMPTS, ks=ks, metric="ssim")
    assert seen == [["K=0.5000", "K=0.8750"]]
    assert list(chosen.table["ssim"]) == [0.9, 0.9, 0.95] and chosen.k == 0.875
