"""What a weight budget charges for the protected layers' weights, on SDXL-Turbo's published data.

The numbers are measured on the MixDQ authors' table (794 layers, 9 protected at the 1% share) with the
default CBC solver and auto K; they are deterministic (no timing, no randomness).
"""

import argparse
import json
import re
import warnings

import pytest

from mixdq.allocate import Allocator, BelowUniformWidthWarning, InfeasibleBudgetError
from mixdq.cli.allocate import PUBLISHED_SOURCE, add_parser
from mixdq.config import Budget, ConfigError, PrecisionConfig
from mixdq.memory import MB, average_weight_bits, weight_memory
from mixdq.sensitivity import SDXL_TURBO_MODEL_ID, load_published_table, sdxl_turbo_inventory, select_protected

LAYERS = 794
PROTECTED = 9


@pytest.fixture(scope="module")
def allocators():
    table = load_published_table()
    protected = select_protected(table)
    inventory = sdxl_turbo_inventory()
    return {
        mode: Allocator(table, protected, inventory, model_id=SDXL_TURBO_MODEL_ID, protected_weights=mode)
        for mode in ("inside", "outside", "act_only")
    }


def allocate_quietly(allocator, **kwargs):
    """An allocation that must not warn below the uniform width."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BelowUniformWidthWarning)
        return allocator.allocate(**kwargs)


def test_inside_w8_puts_28_layers_below_8_and_says_what_to_do(allocators):
    allocator = allocators["inside"]
    assert len(allocator.protected) == PROTECTED
    with pytest.warns(BelowUniformWidthWarning, match=r"28 of them are below 8 bits \(lowest 2\)") as record:
        result = allocator.allocate(weight_bits=8.0)
    (warning,) = record
    bits = result.weight.bits
    assert len(bits) == LAYERS - PROTECTED
    assert sum(b < 8 for b in bits.values()) == 28 and sorted(bits.values()).count(2) == 1
    below = result.below_uniform
    assert (below.width, below.layers, below.total, below.lowest_bit) == (8, 28, 785, 2)
    assert below.allocated_bits == pytest.approx(7.893, abs=5e-4)  # what 8.00 leaves once 9 layers cost 16 bits
    assert str(warning.message) == below.message and "\n" not in below.message
    assert "use protected_weights='outside'" in below.message and "'act_only'" in below.message
    assert "--protected-weights" in below.message
    assert result.config.metadata["allocation"]["below_uniform"] == below.message
    assert abs(result.weight.average_bits - 8.0) <= allocator.band  # the budget itself is met
    assert result.weight.overall_bits == result.weight.average_bits  # inside: the budget is the overall average
    assert result.weight.allocated_bits < 8.0


def test_outside_w8_keeps_every_layer_at_8(allocators):
    allocator = allocators["outside"]
    result = allocate_quietly(allocator, weight_bits=8.0)
    assert result.below_uniform is None
    assert len(result.weight.bits) == LAYERS - PROTECTED and set(result.weight.bits.values()) == {8}
    assert result.weight.average_bits == result.weight.allocated_bits == pytest.approx(8.0, abs=1e-12)
    assert result.weight.overall_bits == pytest.approx(8.106, abs=5e-4)  # the 9 FP16 layers still cost memory
    assert result.weight_mb == pytest.approx(2605.95, abs=0.005)
    config = result.config
    assert sorted(config.protected) == sorted(allocator.protected)
    layers = list(sdxl_turbo_inventory().layers)
    assert average_weight_bits(layers, config) == pytest.approx(result.weight.overall_bits, abs=1e-9)
    assert config.metadata["allocation"]["protected_weights"] == "outside"
    assert config.metadata["allocation"]["weight"]["overall_bits"] == result.weight.overall_bits


def test_act_only_w8_quantizes_the_protected_weights_too(allocators):
    allocator = allocators["act_only"]
    result = allocate_quietly(allocator, weight_bits=8.0)
    config = result.config
    assert len(config.weight_bits) == LAYERS and set(config.weight_bits.values()) == {8}
    assert result.weight_mb == pytest.approx(2572.0, abs=0.05)
    assert config.protected == []  # MixDQ's configs: only the protected layers' activations stay FP16
    assert len(config.act_bits) == LAYERS - PROTECTED
    for name in allocator.protected:
        assert config.layer_weight_bits(name) == 8 and config.layer_act_bits(name) is None
    assert config.metadata["allocation"]["protected_layers"] == list(allocator.protected)
    weight_yaml, act_yaml = config.to_mixdq_yaml(list(sdxl_turbo_inventory().layers))
    reloaded = PrecisionConfig.from_mixdq_yaml(weight_yaml, act_yaml)
    assert reloaded.protected == [] and reloaded.weight_bits == config.weight_bits
    assert reloaded.act_bits == config.act_bits


def test_only_the_widest_width_warns_mixed_budgets_and_other_modes_do_not(allocators):
    # 4.00 inside leaves the other layers 3.84 bits on average and puts some at 2, but below the widest width
    # that is mixed precision's own trade (2 and 8 bits mixed by choice): silent, as are 5.0, 7.9 and MB caps.
    inside = allocators["inside"]
    result = allocate_quietly(inside, weight_bits=4.0)
    assert result.below_uniform is None and min(result.weight.bits.values()) == 2
    assert sum(b < 4 for b in result.weight.bits.values()) > 0
    assert allocate_quietly(inside, weight_bits=5.0).below_uniform is None
    assert allocate_quietly(inside, weight_bits=7.9).below_uniform is None  # below 8: asked for less than W8
    for mode in ("outside", "act_only"):
        result = allocate_quietly(allocators[mode], weight_bits=4.0)
        assert result.below_uniform is None and min(result.weight.bits.values()) == 2
        assert abs(result.weight.allocated_bits - 4.0) <= allocators[mode].band
    # A MB budget is a cap on memory, which no accounting of bits changes: never a width warning.
    assert allocate_quietly(inside, weight_mb=2600.0).below_uniform is None


@pytest.mark.parametrize("mode", ["inside", "outside", "act_only"])
def test_bits_to_mb_and_back_is_the_memory_of_the_result(allocators, mode):
    allocator = allocators[mode]
    for bits in (3.0, 4.25, 8.0):
        assert allocator.mb_to_bits(allocator.bits_to_mb(bits)) == pytest.approx(bits, abs=1e-12)
    assert allocator.bits_to_mb(allocator.mb_to_bits(1300.0)) == pytest.approx(1300.0, abs=1e-9)
    result = allocate_quietly(allocator, weight_bits=5.0, act_bits=None)
    assert allocator.bits_to_mb(result.weight.average_bits) == pytest.approx(result.weight_mb, abs=1e-6)
    layers, other = list(sdxl_turbo_inventory().layers), sdxl_turbo_inventory().other_params
    assert result.weight_mb == pytest.approx(weight_memory(layers, result.config, other).total_bytes / MB, abs=1e-9)
    capped = allocate_quietly(allocator, weight_mb=1300.0, act_bits=None)
    assert 1290.0 <= capped.weight_mb <= 1300.0  # a MB budget is a cap in every mode


def test_inside_conversion_is_the_overall_average(allocators):
    inside, outside = allocators["inside"], allocators["outside"]
    assert inside.bits_to_mb(8.0) == pytest.approx(inside.scale.mb(8.0), abs=1e-12)
    assert outside.bits_to_mb(8.0) == pytest.approx(inside.bits_to_mb(8.106), abs=0.2)  # 8 on 785 = 8.106 on 794


def test_the_feasible_range_follows_the_mode_and_reads_low_to_high(allocators):
    expected = {"inside": (2.8011, 8.1057), "outside": (2.6243, 8.0), "act_only": (2.6169, 8.0)}
    for mode, (low, high) in expected.items():
        allocator = allocators[mode]
        assert allocator.feasible_range("weight") == pytest.approx((low, high), abs=1e-4)
        with pytest.raises(InfeasibleBudgetError) as info:
            allocator.allocate(weight_bits=high + 0.05)
        ranges = [(float(a), float(b)) for a, b in re.findall(r"(\d+(?:\.\d+)?) to (\d+(?:\.\d+)?)", str(info.value))]
        assert len(ranges) == 2 and all(a < b for a, b in ranges)  # bits and MB
        assert ranges[0] == pytest.approx((low, high), abs=1e-4)
    outside_text = "9 protected layers in FP16 not counted in the weight average"
    with pytest.raises(InfeasibleBudgetError, match=outside_text):
        allocators["outside"].allocate(weight_bits=8.5)


def test_a_bad_mode_or_budget_is_one_clear_error():
    table = load_published_table()
    with pytest.raises(ValueError, match=r"protected_weights 'both' is not one of \['inside', 'outside', 'act_only'\]"):
        Allocator(table, protected_weights="both")
    allocator = Allocator(table)
    with pytest.raises(ValueError, match="exactly one weight budget"):
        allocator.allocate(weight_bits=4.0, budget=Budget(4.0))
    with pytest.raises(ValueError, match="needs the model's layer inventory"):
        allocator.allocate(budget=Budget(1300.0, "mb"))
    with pytest.raises(ValueError, match="needs the model's layer inventory"):
        allocator.bits_to_mb(4.0)
    for value, unit in ((0.0, "bits"), (float("nan"), "bits"), (True, "bits"), ("4", "bits"), (4.0, "MB")):
        with pytest.raises(ValueError, match="budget (value|unit)"):
            Budget(value, unit)


def test_budget_is_recorded_and_read_back(allocators, tmp_path):
    allocator = allocators["outside"]
    result = allocate_quietly(allocator, budget=Budget(8.0), act_bits=None)
    assert result.config.budget == Budget(8.0, "bits")
    path = result.config.save(tmp_path / "w8.json")
    assert json.loads(path.read_text())["metadata"]["budget"] == {"value": 8.0, "unit": "bits"}
    assert PrecisionConfig.load(path).budget == Budget(8.0, "bits")
    mb = allocate_quietly(allocator, weight_mb=1300, act_bits=None).config
    assert PrecisionConfig.from_json(mb.to_json()).budget == Budget(1300.0, "mb")
    old = PrecisionConfig(weight_bits={"a": 4})  # configs from before budgets were recorded still load
    assert PrecisionConfig.from_json(old.to_json()).budget is None
    data = result.config.to_dict()
    data["metadata"]["budget"] = {"value": 8.0, "unit": "GB"}
    with pytest.raises(ConfigError, match=r"^metadata.budget: budget unit 'GB' is not one of \['bits', 'mb'\]\.$"):
        PrecisionConfig.from_dict(data)
    data["metadata"]["budget"] = 8.0
    with pytest.raises(ConfigError, match="must be an object with 'value' and 'unit'"):
        PrecisionConfig.from_dict(data)
    data["metadata"]["budget"] = {"value": 10**400, "unit": "bits"}
    with pytest.raises(ConfigError, match=r"^metadata.budget: budget value <an integer over 2\*\*256> must be"):
        PrecisionConfig.from_dict(data)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="python -m mixdq")
    add_parser(parser.add_subparsers())
    args = parser.parse_args([*argv, "--source", PUBLISHED_SOURCE])
    return args.handler(args)


def test_cli_protected_weights_flag(tmp_path, capsys):
    base = ["allocate", "--budget-bits", "8", "--act-bits", "fp16"]
    assert run_cli([*base, "--out", str(tmp_path / "inside.json")]) == 0
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("warning: weight budget 8.00 bits counts the 9 protected layers' FP16 weights")
    assert "28 of them are below 8 bits (lowest 2)" in line and "--protected-weights outside or act_only" in line

    assert run_cli([*base, "--protected-weights", "outside", "--out", str(tmp_path / "outside.json")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "UNet weights: 2606.0 MB" in captured.out
    assert "FP16 protected ones at 16 bits: 8.106 average bits" in captured.out
    outside = PrecisionConfig.load(tmp_path / "outside.json")
    assert set(outside.weight_bits.values()) == {8} and len(outside.protected) == PROTECTED
    assert outside.budget == Budget(8.0, "bits")

    assert run_cli([*base, "--protected-weights", "act_only", "--out", str(tmp_path / "act_only.json")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "UNet weights: 2572.0 MB" in captured.out
    act_only = PrecisionConfig.load(tmp_path / "act_only.json")
    assert len(act_only.weight_bits) == LAYERS and act_only.protected == []

    with pytest.raises(SystemExit):
        run_cli([*base, "--protected-weights", "both", "--out", str(tmp_path / "x.json")])
    assert "invalid choice: 'both'" in capsys.readouterr().err
