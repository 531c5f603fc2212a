"""The studio's compare service on the embedded model: the same noise, metrics, and the model's own judges."""

import math
from pathlib import Path

from mixdq.config import PrecisionConfig
from mixdq.evaluate.compare import pair_metrics
from studio.services import ModelWorkspace, compare_report

ROOT = Path(__file__).resolve().parent.parent


def test_pair_metrics_identical_images():
    import torch

    image = torch.rand(3, 32, 32)
    metrics = pair_metrics(image, image)
    assert metrics["psnr"] == math.inf and abs(metrics["ssim"] - 1.0) < 1e-6


def test_compare_on_the_embedded_model(tmp_path):
    """Compare renders FP, the simulation and the deployed model (CPU reference path) from the same noise."""
    from mixdq.models import load_pipeline

    workspace = ModelWorkspace.from_pipeline(load_pipeline(device="cpu"), tmp_path)
    fp_only = PrecisionConfig(model_id=workspace.model_id)  # nothing quantized: all three images must match
    out = workspace.compare(
        fp_only, "a large red circle in the center, on a white background", seed=3, steps=1, size=128
    )
    result, m = out["result"], out["metrics"]
    assert result.deployed_vs_fp16["psnr"] == math.inf and result.deployed_vs_simulated["psnr"] == math.inf
    assert m["clip_fp"] == m["clip_quant"]
    assert m["aligned_fp"] is True and m["aligned_quant"] is True  # the embedded model draws this caption right
    w8 = PrecisionConfig.uniform(workspace.layers, 8, None, model_id=workspace.model_id)
    stages = []
    out = workspace.compare(w8, "a photo of a cat", seed=3, steps=1, size=128, on_stage=stages.append)
    result = out["result"]
    assert out["metrics"]["aligned_fp"] is None  # not a caption the checker can read
    assert 30 < result.deployed_vs_fp16["psnr"] < math.inf
    # W8A16 deployed = its simulation up to float rounding of the packed-weight matmul
    assert result.deployed_vs_simulated["psnr"] > 60
    assert result.redeployed and "packing weights (deploy)" in stages
    # bytes the deployed UNet holds (float32 scales, row sums) within 15% of the exact accounting, ~2x below FP
    assert result.accounted_bytes <= result.measured_bytes < 1.15 * result.accounted_bytes
    assert result.measured_bytes < result.fp16_bytes / 1.7
    assert "PyTorch integer reference path on the CPU" in result.kernel_path
    assert out["fp"].size == (128, 128) and out["diff"].size == (128, 128) and out["simulated"].size == (128, 128)
    again = workspace.compare(w8, "a photo of a cat", seed=3, steps=1, size=128)["result"]
    assert not again.redeployed and again.deploy is result.deploy  # same config: the deployed UNet is reused
    report = compare_report(out, "cpu")
    assert "deployed vs simulation" in report and f"{result.measured_bytes / 1e6:,.1f} MB held" in report


def test_shipped_table_is_used_only_for_its_own_model(tmp_path, random_pipe):
    from mixdq.inventory import layer_inventory
    from mixdq.models import load_pipeline
    from studio.sources import find_model_table

    # the random fixture has the embedded model's layer names but other widths
    assert find_model_table(layer_inventory(random_pipe.unet), tmp_path) is None
    table = find_model_table(layer_inventory(load_pipeline(device="cpu").unet), tmp_path)
    assert table is not None and table.layer.nunique() == 264


def test_model_info_from_config_files_matches_the_loaded_pipeline():
    """The studio serves its page from the model's config files; the pipeline loads later. Both must agree."""
    from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID, load_pipeline
    from studio.services import ModelInfo
    from studio.sources import model_folder, model_info_from_folder

    assert model_folder(None) == EMBEDDED_MODEL_DIR
    from_files = model_info_from_folder(model_folder(None), EMBEDDED_MODEL_ID, "cpu")
    assert from_files == ModelInfo.of_pipeline(load_pipeline(device="cpu"))


def test_preview_returns_the_exact_allocation_once_it_is_solved():
    """Slider previews use the greedy only until the background solver has the exact answer."""
    from studio.services import allocate, published_source

    source = published_source()
    budget = 5.35  # a slider position no other test solves
    assert not allocate(source, budget, "bits", 8.0, "auto", exact=False).exact
    allocate(source, budget, "bits", 8.0, "auto", exact=True)
    view = allocate(source, budget, "bits", 8.0, "auto", exact=False)
    assert view.exact and "solver cbc" in view.summary and "solved in the background" in view.summary


def test_slider_values_from_mb_land_on_the_precomputed_grid():
    from studio.services import BITS_STEP
    from studio.ui import _on_grid

    assert _on_grid(4.0333, BITS_STEP) == 4.05 and _on_grid(3.9749, BITS_STEP) == 3.95


def test_unet_inventory_is_cached_by_config(tmp_path):
    """Later starts read the inventory from the cache instead of importing diffusers to build it."""
    import shutil

    from mixdq.inventory import inventory_from_unet_config
    from mixdq.models import EMBEDDED_MODEL_DIR
    from studio.sources import unet_inventory

    config = tmp_path / "model" / "config.json"  # a config with no shipped inventory beside it
    config.parent.mkdir()
    shutil.copy(EMBEDDED_MODEL_DIR / "unet" / "config.json", config)
    cache = tmp_path / "cache"
    built = unet_inventory(config, cache)
    assert len(list(cache.glob("studio-inventory-*.json"))) == 1
    assert unet_inventory(config, cache) == built == inventory_from_unet_config(config)


def test_shipped_inventory_matches_the_model(tmp_path):
    """The embedded model ships its layer list (first start without importing diffusers); it must equal a
    fresh build. If this fails after a model or LayerInfo change, regenerate it:
    python -c "from pathlib import Path; from studio.sources import write_shipped_inventory as w;
    w(Path('assets/tiny-sdxl/unet/config.json'))"
    """
    import subprocess
    import sys

    from mixdq.inventory import inventory_from_unet_config
    from mixdq.models import EMBEDDED_MODEL_DIR
    from studio.sources import SHIPPED_INVENTORY, _config_key, _read_inventory

    config = EMBEDDED_MODEL_DIR / "unet" / "config.json"
    key = _config_key(config.read_bytes(), with_diffusers=False)
    shipped = _read_inventory(config.parent / SHIPPED_INVENTORY, key)
    assert shipped is not None, "assets/tiny-sdxl/unet/mixdq_inventory.json is missing or stale"
    assert shipped == inventory_from_unet_config(config)
    code = (
        "import sys; from pathlib import Path; from studio.sources import unet_inventory; "
        f"unet_inventory(Path({str(config)!r}), Path({str(tmp_path)!r})); print('diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"  # served from the shipped file, no diffusers import
    assert not list(tmp_path.iterdir())  # and nothing cached


def test_background_solver_follows_the_dragged_slider(monkeypatch):
    """A preview (a drag) moves the background solver's focus, and prewarm solves the positions nearest the
    focus first, re-reading it after every solve."""
    import dataclasses

    from studio.services import BITS_STEP, DEFAULT_BITS, allocate, published_source

    shared = published_source()
    source = dataclasses.replace(shared, focus_bits=DEFAULT_BITS)  # own focus; the allocator (cache) is shared
    allocate(source, 5.5, "bits", 8.0, "auto", exact=False)
    assert source.focus_bits == 5.5
    source.focus_bits = DEFAULT_BITS
    solved = []

    def record(target, budget, *args):
        if target == "weight":
            solved.append(budget)
        if len(solved) == 3:  # the user drags to 6.0 while the solver works
            source.focus_bits = 6.0

    monkeypatch.setattr(source.allocator, "allocate_side", record)
    source.prewarm(BITS_STEP)
    assert solved[:3] == [4.0, 3.95, 4.05]
    assert solved[3:6] == [6.0, 5.95, 6.05]
    assert len(solved) == len(set(solved))  # every position once


def test_run_options_copy_the_config_with_scales_and_fp8():
    import pytest

    from mixdq.sensitivity.published import sdxl_turbo_inventory
    from studio.services import run_options_text, with_run_options, yaml_refusal

    inventory = sdxl_turbo_inventory()
    config = PrecisionConfig.uniform(list(inventory.layers), 8, 8)
    assert run_options_text(config) == "" and yaml_refusal(config, inventory) is None
    both = with_run_options(config, inventory, "MSE-clipped per row (ours)", fp8=True)
    assert config.weight_clip == "minmax" and config.fp8 == []  # the allocation itself is untouched
    assert both.weight_clip == "mse" and len(both.fp8) == sum(i.kind == "linear" for i in inventory.layers)
    assert run_options_text(both) == f"MSE-clipped weight scales, {len(both.fp8)} A8 linear layers in FP8 e4m3"
    assert "yaml" in yaml_refusal(both, inventory)
    assert with_run_options(both, inventory, "min-max (MixDQ)", fp8=False).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="weight scales must be one of"):
        with_run_options(config, inventory, "percentile", fp8=False)


def test_run_options_and_yaml_files_are_library_calls(tmp_path):
    """The studio's run options and yaml export are PrecisionConfig's own: FP8_CHOICES, with_run_options (a copy,
    the bits unchanged) and save_mixdq_yaml's STEM_weight.yaml / STEM_act.yaml, which load() reads back."""
    import pytest

    from mixdq.config import FP8_CHOICES, ConfigError
    from mixdq.sensitivity.published import sdxl_turbo_inventory
    from studio.services import STUDIO_FP8, export_config

    layers = list(sdxl_turbo_inventory().layers)
    config = PrecisionConfig.uniform(layers, 4, 8)
    config.weight_bits.update({i.name: 8 for i in layers[:100]})
    linears = {i.name for i in layers if i.kind == "linear"}
    w8a8 = config.with_run_options(layers, "minmax", "w8a8")
    assert (
        set(w8a8.fp8) == {n for n in linears if config.weight_bits[n] == 8} and w8a8.weight_bits is config.weight_bits
    )
    a8 = config.with_run_options(layers, "mse", STUDIO_FP8)
    assert set(a8.fp8) == linears and a8.weight_clip == "mse" and FP8_CHOICES[STUDIO_FP8] is True
    assert config.fp8 == [] and config.weight_clip == "minmax"
    assert a8.with_run_options(layers).to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match=r"fp8 'fp4' not allowed; choose from \['none', 'w8a8', 'a8'\]"):
        config.with_run_options(layers, fp8="fp4")
    weight, act = config.save_mixdq_yaml(tmp_path, "turbo", layers)
    assert (weight.name, act.name) == ("turbo_weight.yaml", "turbo_act.yaml")  # the CLI's --yaml-out names
    back = PrecisionConfig.load(weight, layers)
    assert back.weight_bits == config.weight_bits and back.act_bits == config.act_bits
    exported = sorted(p.name for p in export_config(config, sdxl_turbo_inventory(), tmp_path / "studio"))
    stem = exported[0].removesuffix(".json")
    assert exported == [f"{stem}.json", f"{stem}_act.yaml", f"{stem}_weight.yaml"]


def test_check_table_matches_names_the_disagreement():
    import dataclasses

    import pytest

    from mixdq.sensitivity.published import load_published_table, sdxl_turbo_inventory
    from mixdq.sensitivity.table import SensitivityTableError, check_table_matches

    table, layers = load_published_table(), list(sdxl_turbo_inventory().layers)
    check_table_matches(table, layers)
    with pytest.raises(SensitivityTableError, match="disagree on layers: missing \\[\\], unknown \\['"):
        check_table_matches(table, layers[1:])
    first = layers[0]
    wider = dataclasses.replace(first, out_features=2 * first.out_features)
    with pytest.raises(SensitivityTableError, match=f"layer '{first.name}': table weight size"):
        check_table_matches(table, [wider, *layers[1:]])
