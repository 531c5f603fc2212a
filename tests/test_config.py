"""PrecisionConfig: JSON and MixDQ-yaml round trips, and one clear error for each kind of bad input."""

import json

import pytest

from mixdq.config import FORMAT_NAME, ConfigError, PrecisionConfig
from mixdq.inventory import inventory_fingerprint, layer_inventory

TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def layers(random_pipe):
    return layer_inventory(random_pipe.unet)


@pytest.fixture()
def mixed(layers):
    config = PrecisionConfig.uniform(layers, 4, 8, model_id="random-tiny")
    config.weight_bits[TO_K] = 2
    config.act_bits["conv_in"] = 4
    del config.act_bits["conv_out"]
    config.protected = ["conv_out", "time_embedding.linear_1"]
    return config


def test_json_round_trip(mixed, layers, tmp_path):
    path = mixed.save(tmp_path / "cfg.json")
    loaded = PrecisionConfig.load(path)
    assert loaded == mixed
    loaded.validate(layers)
    assert json.loads(path.read_text())["format"] == FORMAT_NAME
    assert loaded.layer_weight_bits(TO_K) == 2
    assert loaded.layer_weight_bits("conv_out") is None  # protected wins over the weight map
    assert loaded.layer_act_bits("conv_in") == 4


def test_mixdq_yaml_round_trip(mixed, layers):
    weight_yaml, act_yaml = mixed.to_mixdq_yaml(layers)
    assert f"model.{TO_K}: 2" in weight_yaml
    assert "model.conv_out: 16" in weight_yaml
    back = PrecisionConfig.from_mixdq_yaml(weight_yaml, act_yaml, layers, model_id="random-tiny")
    for info in layers:
        assert back.layer_weight_bits(info.name) == mixed.layer_weight_bits(info.name)
        assert back.layer_act_bits(info.name) == mixed.layer_act_bits(info.name)
    assert back.protected == ["conv_out", "time_embedding.linear_1"]
    assert back.fingerprint == inventory_fingerprint(layers)


def test_mixdq_yaml_files(mixed, layers, tmp_path):
    weight_yaml, act_yaml = mixed.to_mixdq_yaml(layers)
    (tmp_path / "w.yaml").write_text(weight_yaml)
    (tmp_path / "a.yaml").write_text(act_yaml)
    back = PrecisionConfig.load_mixdq_yaml(tmp_path / "w.yaml", tmp_path / "a.yaml", layers)
    assert back.weight_bits == {k: v for k, v in mixed.weight_bits.items() if k not in mixed.protected}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.weight_bits.update({"down_blocks.9.nope": 4}), "weight_bits: unknown layer 'down_blocks.9.nope'"),
        (lambda c: c.weight_bits.update({TO_K: 3}), f"weight_bits: layer '{TO_K}' has bits 3; allowed: [2, 4, 8]"),
        (lambda c: c.act_bits.update({TO_K: 2}), f"act_bits: layer '{TO_K}' has bits 2; allowed: [4, 8]"),
        (lambda c: c.act_bits.update({TO_K: True}), "has bits True"),
        (lambda c: c.protected.append("ghost"), "protected: unknown layer 'ghost'"),
        (lambda c: setattr(c, "fingerprint", "0123456789abcdef"), "made for another model (random-tiny"),
    ],
)
def test_bad_configs_name_the_first_offender(mixed, layers, mutate, message):
    mutate(mixed)
    with pytest.raises(ConfigError) as err:
        mixed.validate(layers)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON: Expecting property name"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"format": "other"}', "not a MixDQ Studio precision config"),
        (json.dumps({"format": FORMAT_NAME, "schema_version": 99}), "unsupported schema_version 99"),
        (
            json.dumps({"format": FORMAT_NAME, "schema_version": 1, "weight_bits": [4]}),
            "'weight_bits' must be a JSON object",
        ),
    ],
)
def test_malformed_json(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        PrecisionConfig.from_json(text)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        PrecisionConfig.load(tmp_path / "missing.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not a text file"):
        PrecisionConfig.load(tmp_path / "bin.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ("down_blocks.0.resnets.0.conv1: 4\n", "lacks the 'model.' prefix"),
        ("model.conv_in: four\n", "has bits 'four'"),
        ("- 1\n- 2\n", "must map layer names to bits"),
        ("model.conv_in: 4\n  x: 3\n", "is not valid yaml: mapping values are not allowed in this context at line 2"),
        ("model.conv_in: [4\n", "the value of 'model.conv_in' is a list at line 1, column 16"),
    ],
)
def test_bad_mixdq_yaml(text, message):
    with pytest.raises(ConfigError, match=message):
        PrecisionConfig.from_mixdq_yaml(text)


def test_yaml_with_unknown_layer_is_rejected_whole(layers):
    with pytest.raises(ConfigError, match="unknown layer 'ghost'"):
        PrecisionConfig.from_mixdq_yaml("model.conv_in: 4\nmodel.ghost: 8\n", layers=layers)
