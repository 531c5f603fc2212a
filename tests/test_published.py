"""The SDXL-Turbo sensitivities published by the MixDQ authors, loaded into the tidy table."""

import pytest

from mixdq.allocate import Allocator, group_targets
from mixdq.sensitivity import (
    COLUMNS,
    load_published_table,
    read_table,
    sdxl_turbo_inventory,
    select_protected,
    size_ratio,
    write_table,
)

# The 1% the authors keep in FP16 (their integer_programming.py: act_sensitivity_{sqnr,ssim}_1)
MIXDQ_PROTECTED = {
    "conv_in",
    "conv_out",
    "down_blocks.0.resnets.0.conv2",
    "up_blocks.2.resnets.2.conv_shortcut",
    "down_blocks.2.attentions.1.transformer_blocks.6.ff.net.2",
    "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.2.attentions.1.transformer_blocks.8.ff.net.2",
    "down_blocks.2.attentions.1.transformer_blocks.5.ff.net.2",
    "down_blocks.2.attentions.1.transformer_blocks.7.ff.net.2",
}


@pytest.fixture(scope="module")
def table():
    return load_published_table()


def test_table_shape_and_groups(table):
    assert tuple(table.columns) == COLUMNS
    layers = table.drop_duplicates("layer")
    assert len(layers) == 794 and (layers["group"] == "content").sum() == 420
    counts = table.groupby(["target", "metric"])["layer"].nunique().to_dict()
    assert counts == {("act", "sqnr"): 794, ("act", "ssim"): 420, ("weight", "sqnr"): 794, ("weight", "ssim"): 420}
    assert set(table["bit"]) == {2, 4, 8}
    assert set(table.loc[table["metric"] == "ssim", "group"]) == {"content"}


def test_sizes_are_exact_element_counts(table):
    numel = {info.name: info.weight_numel for info in sdxl_turbo_inventory().layers}
    weights = table.loc[table["target"] == "weight"].drop_duplicates("layer")
    assert dict(zip(weights["layer"], weights["size"])) == numel
    assert weights["size"].sum() == 2_565_880_320  # README: sum × 11520
    acts = table.loc[table["target"] == "act"].drop_duplicates("layer").set_index("layer")["size"]
    assert acts["time_embedding.linear_1"] == 320 and acts["conv_in"] == 4 * 64 * 64


def test_size_ratios_match_the_published_facts(table):
    assert size_ratio(table, "weight") == pytest.approx(2.2418, abs=5e-5)
    assert size_ratio(table, "act") == pytest.approx(1.2062, abs=5e-5)


def test_protected_layers_are_the_authors_nine(table):
    assert set(select_protected(table, share=0.01)) == MIXDQ_PROTECTED
    assert len(select_protected(table, share=0.05)) == 19 + 21


def test_published_w4_group_averages(table):
    """README: at the published 4.00-bit weight config, content 3.364 and quality 5.448 bits.

    MixDQ's formula with r_w and K = 0.6175 gives those group targets within the ±0.02 band. Our
    "auto" K is chosen by a stated criterion, not by the authors' image-based pick; the test only
    reports where it lands (the authors' weight allocation protects no layer, so neither does this).
    """
    r = size_ratio(table, "weight")
    targets = group_targets(4.0, 0.6175, r)
    assert targets["content"] == pytest.approx(3.364, abs=0.02)
    assert targets["quality"] == pytest.approx(5.448, abs=0.02)
    auto = Allocator(table).allocate_side("weight", 4.0, solver="approx")
    print(
        f"auto K at 4.00 bits: {auto.k:.4f} (content {auto.groups['content'].average:.3f}, "
        f"quality {auto.groups['quality'].average:.3f}); published K ≈ 0.6175"
    )
    assert 0.3 < auto.k < 1.0


def test_table_round_trips_through_csv(table, tmp_path):
    path = write_table(table, tmp_path / "published.csv")
    again = read_table(path)
    assert again.equals(table)
