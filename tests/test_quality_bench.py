"""What the ablation bench (bench/quality.py) relies on: the naive (no-BOS) switch, the allocator's metric
override, the single-metric sweep setting, the evaluate CLI, and merging extra rows into a shipped table."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixdq.allocate import Allocator, candidate_bits
from mixdq.calibrate import calibrate
from mixdq.cli import main
from mixdq.config import ConfigError, PrecisionConfig
from mixdq.evaluate import evaluate
from mixdq.inventory import layer_inventory
from mixdq.quant import quant_layers, quantize_
from mixdq.sensitivity.sweep import SweepSettings
from mixdq.sensitivity.table import COLUMNS, read_table, select_protected

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle above a blue square", "a green triangle on a white background"]
SETTINGS = {"num_inference_steps": 1, "height": 64, "width": 64, "batch_size": 2, "progress": False}
TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def latents(pipe) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        PROMPTS,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=64,
        width=64,
        generator=generator,
        output_type="latent",
    ).images


# ---- the BOS switch ---------------------------------------------------------------------------------
def test_naive_calibration_and_quantization_include_the_bos_token(fresh_random_pipe, tmp_path):
    pipe = fresh_random_pipe
    pipe.set_progress_bar_config(disable=True)
    layers = layer_inventory(pipe.unet)
    config = PrecisionConfig.uniform(layers, 8, 8)
    aware = calibrate(pipe, PROMPTS, cache_dir=tmp_path, act_bits=(8,), **SETTINGS)
    naive = calibrate(pipe, PROMPTS, cache_dir=tmp_path, act_bits=(8,), bos_aware=False, **SETTINGS)
    # the flag is part of the cache key: two cached calibrations, each read back for its own flag
    assert len(list(tmp_path.glob("calib-*"))) == 2
    assert naive.provenance["quantizer"]["bos_aware_text_embedding"] is False
    assert aware.provenance["quantizer"]["bos_aware_text_embedding"] is True
    assert (
        calibrate(pipe, PROMPTS, cache_dir=tmp_path, act_bits=(8,), bos_aware=False, **SETTINGS).provenance
        == naive.provenance
    )
    # to_k's input is the text embedding itself (one step, one batch: the range is its exact min/max): the naive
    # range covers every token, the BOS-aware one tokens 1.. only
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(naive.ranges[8][TO_K][0], torch.stack(torch.aminmax(embeds)))
    torch.testing.assert_close(aware.ranges[8][TO_K][0], torch.stack(torch.aminmax(embeds[:, 1:])))

    quantize_(pipe, config, act_ranges=naive, bos_aware=False)
    assert not any(layer.bos_aware for layer in quant_layers(pipe).values())
    naive_out = latents(pipe)
    quantize_(pipe, config, act_ranges=aware)  # the default is MixDQ's BOS-aware quantization
    flags = {name: layer.bos_aware for name, layer in quant_layers(pipe).items()}
    assert flags == {i.name: i.takes_text_embedding for i in layers} and any(flags.values())
    assert not torch.allclose(naive_out, latents(pipe))
    # ranges calibrated one way are refused for the other
    with pytest.raises(ConfigError, match="calibrated with bos_aware=False.*bos_aware=True"):
        quantize_(pipe, config, act_ranges=naive)


# ---- the allocator's metric override --------------------------------------------------------------------
# Two content layers c1, c2 and two quality layers (sizes 1). SSIM prefers c1 at 8 bits, SQNR prefers c2:
# at a content target of 5 bits the only choices are (c1, c2) = (8, 2) or (2, 8).
SSIM = {"c1": [0.50, 0.80, 0.90], "c2": [0.60, 0.70, 0.95]}  # (8, 2): 1.50 > (2, 8): 1.45
SQNR = {"c1": [10.0, 20.0, 30.0], "c2": [10.0, 12.0, 40.0], "q1": [10.0, 30.0], "q2": [10.0, 25.0]}  # (2, 8) wins


def metric_table() -> pd.DataFrame:
    rows = []
    for metric, values in (("ssim", SSIM), ("sqnr", SQNR)):
        for name, scores in values.items():
            group = "content" if name.startswith("c") else "quality"
            for bit, value in zip(candidate_bits("weight", group), scores, strict=True):
                rows.append((name, group, "linear", "mid", 1.0, bit, "weight", metric, value))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_allocator_scores_groups_by_the_metric_it_is_given():
    table = metric_table()
    budget, k = (5 * 2 + 6 * 2) / 4, 5 / 6  # content target 5, quality target 6
    decoupled = Allocator(table).allocate(weight_bits=budget, act_bits=None, k=k)
    single = Allocator(table, metrics={"content": "sqnr", "quality": "sqnr"}).allocate(
        weight_bits=budget, act_bits=None, k=k
    )
    assert {n: decoupled.config.weight_bits[n] for n in ("c1", "c2")} == {"c1": 8, "c2": 2}
    assert {n: single.config.weight_bits[n] for n in ("c1", "c2")} == {"c1": 2, "c2": 8}
    assert decoupled.config.metadata["allocation"]["metrics"] == {"content": "ssim", "quality": "sqnr"}
    assert single.config.metadata["allocation"]["metrics"] == {"content": "sqnr", "quality": "sqnr"}
    with pytest.raises(ValueError, match="must map each of the groups"):
        Allocator(table, metrics={"content": "sqnr"})
    with pytest.raises(ValueError, match="must map each of the groups"):
        Allocator(table, metrics={"content": "lpips", "quality": "sqnr"})


def test_protected_layers_by_a_chosen_metric():
    rows = [
        ("c1", "content", 8, "ssim", 0.99),
        ("c2", "content", 8, "ssim", 0.50),
        ("c1", "content", 8, "sqnr", 5.0),
        ("c2", "content", 8, "sqnr", 30.0),
        ("q1", "quality", 8, "sqnr", 20.0),
        ("q2", "quality", 8, "sqnr", 40.0),
    ]
    table = pd.DataFrame(
        [(n, g, "linear", "mid", 1.0, b, "act", m, v) for n, g, b, m, v in rows], columns=list(COLUMNS)
    )
    assert select_protected(table, 0.5) == ["c2", "q1"]
    assert select_protected(table, 0.5, metrics={"content": "sqnr", "quality": "sqnr"}) == ["c1", "q1"]


def test_sweep_metric_setting():
    decoupled = SweepSettings(prompts=("a",))
    single = SweepSettings(prompts=("a",), metrics="sqnr")
    assert (decoupled.metric("content"), decoupled.metric("quality")) == ("ssim", "sqnr")
    assert (single.metric("content"), single.metric("quality")) == ("sqnr", "sqnr")
    with pytest.raises(ValueError, match="'ssim-only' is not one of"):
        SweepSettings(prompts=("a",), metrics="ssim-only")


# ---- evaluate: per-config BOS flag and the CLI --------------------------------------------------------------
def test_evaluate_rejects_a_bos_flag_for_an_unknown_config(random_pipe):
    with pytest.raises(ValueError, match="bos_aware: unknown config 'W9'"):
        evaluate(random_pipe, {"FP": None}, PROMPTS, bos_aware={"W9": False}, progress=False)


def test_evaluate_cli_on_a_saved_pipeline(tmp_path, capsys):
    from mixdq.models import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "pipe")
    PrecisionConfig.uniform(layer_inventory(pipe.unet), 8, 8).save(tmp_path / "w8a8.json")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "pipe"),
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config",
            f"W8A8={tmp_path / 'w8a8.json'}",
            "--config",
            f"naive={tmp_path / 'w8a8.json'}",
            "--naive",
            "naive",
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--calibration-prompts",
            str(tmp_path / "prompts.txt"),
            "--steps",
            "1",
            "--size",
            "64",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "out" / "eval"),
        ]
    )
    assert code == 0
    table = pd.read_csv(tmp_path / "out" / "eval.csv")
    assert table["config"].tolist() == ["FP", "W8A8", "naive"]
    assert table.loc[0, "ssim"] == 1.0 and table.loc[0, "psnr_db"] == float("inf")
    assert table.loc[1, "psnr_db"] != table.loc[2, "psnr_db"]  # the naive row really ran without BOS handling
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["settings"]["num_prompts"] == 2
    assert "results ->" in capsys.readouterr().out


def test_evaluate_cli_rejects_unknown_naive_name(tmp_path):
    with pytest.raises(SystemExit, match="--naive 'W4' is not a --config name"):
        main(["evaluate", "--device", "cpu", "--naive", "W4", "--out", str(tmp_path / "x")])


# ---- bench/quality.py: appending rows to the shipped table ---------------------------------------------------
def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_keeps_existing_rows_byte_identical(tmp_path, monkeypatch):
    bench = load_bench()
    shipped = tmp_path / "sensitivity.csv"
    old = metric_table()
    old = old.loc[(old["group"] == "quality") | (old["metric"] == "ssim")]
    old.to_csv(shipped, index=False)
    before = shipped.read_text()
    monkeypatch.setattr(bench, "SHIPPED_TABLE", shipped)
    extra = metric_table().loc[lambda t: (t["group"] == "content") & (t["metric"] == "sqnr")]
    assert bench.merge_into_shipped(extra)
    assert shipped.read_text().startswith(before)
    assert len(read_table(shipped)) == len(metric_table())
    assert not bench.merge_into_shipped(extra)  # the rows are there already


def test_held_out_prompts_half_one_half_two_objects():
    prompts, scenes = load_bench().held_out_prompts(8)
    assert [len(s.objects) for s in scenes] == [1] * 4 + [2] * 4
    assert prompts == [s.caption() for s in scenes]


def test_validation_captions_that_choose_k_are_not_the_reported_ones():
    bench = load_bench()
    reported = set(bench.held_out_prompts(256)[0])
    assert reported & set(bench.validation_prompts(64))  # the small 1-object caption space repeats captions
    validation = bench.validation_prompts(64, exclude=reported)
    assert len(validation) == 64 and not reported & set(validation)


def test_content_rows_swept_at_other_settings_replace_the_shipped_ones():
    """``bench/quality.py --content-sensitivity``: content rows of the swept metric are replaced, nothing else."""
    table = metric_table()
    swept = table.loc[(table["group"] == "content") & (table["metric"] == "ssim")].assign(value=0.5)
    merged = load_bench().replace_content_rows(table, pd.concat([swept, table.loc[table["group"] == "quality"]]))
    assert len(merged) == len(table)
    content_ssim = (merged["group"] == "content") & (merged["metric"] == "ssim")
    assert (merged.loc[content_ssim, "value"] == 0.5).all()
    rest = merged.loc[~content_ssim].sort_values(list(COLUMNS)).reset_index(drop=True)
    assert rest.equals(table.loc[~((table["group"] == "content") & (table["metric"] == "ssim"))]
                       .sort_values(list(COLUMNS)).reset_index(drop=True))  # fmt: skip


def test_fixed_k_rows_carry_their_k_fp8_list_and_weight_clip():
    """``bench/quality.py --k``: mixed-precision rows allocated at that K; the FP8 and MSE-clip rows are their
    int8 / min-max twins with only the format changed."""
    from mixdq.models import load_pipeline

    bench = load_bench()
    pipe = load_pipeline(device="cpu", dtype=torch.float32)
    table = read_table(bench.SHIPPED_TABLE)
    rows = ["MixDQ W4A8", "MixDQ W4A8 + MSE clip", "MixDQ W4A8 (FP8 8-bit linears)", "uniform W4A8 + MSE clip"]
    configs, _, _ = bench.ablation_configs(pipe, table, rows=rows, k=0.5)
    plain, mse, fp8 = (configs[label] for label in rows[:3])
    for config in (plain, mse, fp8):
        assert config.metadata["allocation"]["weight"]["k"] == pytest.approx(0.5)
        assert config.weight_bits == plain.weight_bits and config.act_bits == plain.act_bits
    assert (plain.weight_clip, mse.weight_clip, fp8.weight_clip) == ("minmax", "mse", "minmax")
    assert not plain.fp8 and not mse.fp8 and fp8.fp8
    assert all(plain.layer_weight_bits(n) == 8 and plain.layer_act_bits(n) == 8 for n in fp8.fp8)
    assert configs["uniform W4A8 + MSE clip"].weight_clip == "mse"
    w8a8, _, how = bench.ablation_configs(pipe, table, rows=["MixDQ W8A8"], k=1.0)  # K 0.5 cannot reach 8 bits
    assert w8a8["MixDQ W8A8"].metadata["allocation"]["weight"]["k"] == pytest.approx(1.0)
    assert "K fixed at 1" in how["MixDQ W8A8"] and "validation" not in how["MixDQ W8A8"]
