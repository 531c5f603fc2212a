"""The one-layer-at-a-time sensitivity sweep on the random fixture pipeline."""

import pandas as pd
import pytest
import torch

from mixdq.calibrate import calibrate
from mixdq.sensitivity.sweep import SweepSettings, image_ssim, merge_shards, run_sweep, sqnr_db, sweep_jobs

PROMPTS = ("a red circle on the left", "a large blue square at the top")
LAYERS = (
    "conv_in",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.1.conv_shortcut",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
)


def test_metrics_on_known_inputs():
    y = torch.randn(4, 4, 8, 8)
    assert sqnr_db(y, y) == 200.0
    assert sqnr_db(y, y * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise power = 1% of signal
    images = torch.rand(2, 3, 32, 32)
    assert image_ssim(images, images) == pytest.approx(1.0)
    assert image_ssim(images, torch.rand(2, 3, 32, 32)) < 0.2


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from mixdq.models import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    ranges = calibrate(pipe, prompts=list(PROMPTS), num_inference_steps=1, height=64, width=64, progress=False)
    settings = SweepSettings(prompts=PROMPTS, height=64, width=64, layers=LAYERS)
    cache = tmp_path_factory.mktemp("sweep-cache")
    table, stats = run_sweep(pipe, ranges, settings, cache_dir=cache, progress=False)
    return pipe, ranges, settings, cache, table, stats


def test_table_rows_and_metrics(swept):
    *_, table, stats = swept
    assert len(table) == len(LAYERS) * (3 + 2) == stats.evaluations
    content = table[table.group == "content"]
    quality = table[table.group == "quality"]
    assert set(content.metric) == {"ssim"} and set(quality.metric) == {"sqnr"}
    # SSIM vs the FP images of the same noise: one content layer barely moves them, but a 2-bit feed-forward
    # weight does move them (the layer was quantized, the images compared are the same prompts and seed)
    assert (content.value > 0.999).all() and (content.value <= 1 + 1e-6).all()
    ff = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert content.set_index(["layer", "target", "bit"]).value[(ff, "weight", 2)] < 1 - 1e-6
    # fewer bits never help: per layer and target, the value at the lowest bit is the worst
    for (layer, target), rows in table.groupby(["layer", "target"]):
        by_bit = rows.set_index("bit")["value"]
        assert by_bit[min(by_bit.index)] <= by_bit[max(by_bit.index)], (layer, target)
    assert (quality[quality.bit == 8].value > 25).all()  # 8-bit single layers barely change the output
    sizes = table[table.target == "act"].drop_duplicates("layer").set_index("layer")["size"]
    assert sizes["conv_in"] == 4 * 8 * 8  # (C, H, W) of a 64 px latent
    assert sizes["down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"] == 77 * 64
    assert stats.unet_forward_seconds > 0 and set(stats.unet_forward_equivalents()) == {"sqnr", "ssim"}


def test_cache_is_reused_and_shards_merge(swept, monkeypatch):
    pipe, ranges, settings, cache, table, _ = swept
    from mixdq.sensitivity import sweep

    monkeypatch.setattr(sweep, "_Reference", None)  # a cache hit must not run anything
    again, _ = run_sweep(pipe, ranges, settings, cache_dir=cache, progress=False)
    pd.testing.assert_frame_equal(again, table)
    monkeypatch.undo()
    layers = list(LAYERS[:2])
    small = SweepSettings(prompts=PROMPTS, height=64, width=64, layers=tuple(layers), targets=("weight",))
    parts = [run_sweep(pipe, ranges, small, shard=(i, 2), progress=False)[0] for i in range(2)]
    merged = merge_shards(parts).sort_values(["layer", "bit"]).reset_index(drop=True)
    expected = (
        table[(table.target == "weight") & table.layer.isin(layers)]
        .sort_values(["layer", "bit"])
        .reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(merged, expected)
    with pytest.raises(ValueError, match="two rows"):
        merge_shards([parts[0], parts[0]])


def test_unknown_layer_is_rejected(swept):
    pipe, *_ = swept
    from mixdq.inventory import layer_inventory

    bad = SweepSettings(prompts=PROMPTS, layers=("nope",))
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        sweep_jobs(layer_inventory(pipe.unet), bad)
