"""Hostile and malformed config files: every one ends in a ConfigError, quickly, in one short line naming the file.

Generated cases (truncations, type swaps, deep nesting, huge integers, yaml alias bombs, duplicates, unicode, a file
over the size cap) go through ``PrecisionConfig.load``, the loader the CLI and the studio use."""

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from mixdq.config import PrecisionConfig
from mixdq.config_io import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_INT_DIGITS, MAX_MESSAGE_CHARS, ConfigError
from mixdq.inventory import inventory_fingerprint, inventory_from_unet_config
from mixdq.sensitivity.published import sdxl_turbo_inventory

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.0  # per file, on a shared CPU core
NAME = "my-config"  # what the user calls the file; the loader sees a temporary path
TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def layers():
    return list(inventory_from_unet_config(ROOT / "assets" / "tiny-sdxl" / "unet" / "config.json").layers)


@pytest.fixture(scope="module")
def valid(layers):
    config = PrecisionConfig.uniform(layers, 4, 8, protected=["conv_out"], model_id="tiny")
    config.weight_bits[TO_K] = 2
    config.metadata = {"allocation": {"weight": {"average_bits": 4.0}, "note": "ok"}}
    return config


def refuse(path: Path, layers, name: str = NAME + ".json") -> str:
    """Load ``path`` as the user's file ``name``: it must raise ConfigError, in time, in one bounded line."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        PrecisionConfig.load(path, layers, name=name, model_id="tiny")
    seconds = time.perf_counter() - start
    message = str(caught.value)
    assert seconds < SECONDS, f"{seconds:.2f} s for {message}"
    assert len(message.splitlines()) == 1 and len(message) <= MAX_MESSAGE_CHARS
    assert name.split("/")[0] in message and str(path.parent) not in message  # the user's name, not the temp path
    return message


def write(tmp_path: Path, text: str, suffix: str = ".json") -> Path:
    path = tmp_path / f"upload{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def test_every_truncation_of_a_valid_json_is_refused(valid, layers, tmp_path):
    text = valid.to_json().rstrip()
    assert PrecisionConfig.load(write(tmp_path, text), layers) == valid
    offsets = sorted(set(range(200)) | set(range(0, len(text), max(1, len(text) // 300))))
    messages = {refuse(write(tmp_path, text[:offset]), layers) for offset in offsets}
    assert all(m.startswith(f"{NAME}.json is not valid JSON: ") for m in messages)


# Each value below is the wrong kind for the key it replaces, except the three that are allowed.
SWAPS = [None, True, 7, 4.0, "x", [1], {"k": 1}]
ALLOWED_SWAPS = [("model_id", "x"), ("fingerprint", None), ("metadata", {"k": 1})]


def test_every_type_swap_of_a_field_is_refused(valid, layers, tmp_path):
    refused = 0
    for key in valid.to_dict():
        for value in SWAPS:
            data = valid.to_dict() | {key: value}
            path = write(tmp_path, json.dumps(data))
            if (key, value) in ALLOWED_SWAPS:
                assert getattr(PrecisionConfig.load(path, layers), key) == value
                continue
            message = refuse(path, layers)
            assert key in message or "made for another model" in message, message  # a wrong fingerprint: another model
            refused += 1
    assert refused == len(valid.to_dict()) * len(SWAPS) - len(ALLOWED_SWAPS)


@pytest.mark.parametrize(
    "bits, said",
    [
        (4.0, "has bits 4.0"),
        (True, "has bits True"),
        ("4", "has bits '4'"),
        (None, "has bits None"),
        ([4], "has bits <a list of 1 entries>"),
        (3, "has bits 3"),
        (-4, "has bits -4"),
        (10**30, "has bits 1000000000000000000000000000000"),
    ],
)
def test_bit_values_follow_one_rule(valid, layers, tmp_path, bits, said):
    data = valid.to_dict()
    data["weight_bits"][TO_K] = bits
    message = refuse(write(tmp_path, json.dumps(data)), layers)
    assert message == f"{NAME}.json: weight_bits: layer '{TO_K}' {said}; allowed: [2, 4, 8]."


def test_the_same_bit_rule_in_yaml(valid, layers, tmp_path):
    weight_yaml, act_yaml = valid.to_mixdq_yaml(layers)
    (tmp_path / "c.act.yaml").write_text(act_yaml)
    for bits, said in (("4.0", "4.0"), ("true", "True"), ("'4'", "'4'"), ("3", "3"), ("1:30", "90")):
        (tmp_path / "c.weight.yaml").write_text(weight_yaml.replace(f"model.{TO_K}: 2", f"model.{TO_K}: {bits}"))
        message = refuse(tmp_path / "c.weight.yaml", layers, name=f"{NAME}.weight.yaml")
        assert message == f"{NAME}.weight.yaml: layer 'model.{TO_K}' has bits {said}; allowed: [2, 4, 8, 16, 32]."


@pytest.mark.parametrize("shape", ["array", "object", "metadata"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 200_000])
def test_deep_nesting_is_refused_in_bounded_memory(valid, layers, tmp_path, shape, depth):
    inner = {"array": ("[" * depth, "]" * depth), "object": ('{"a":' * depth + "0", "}" * depth)}
    if shape == "metadata":
        head = json.dumps(valid.to_dict()).rsplit('"metadata": ', 1)[0]
        opening, closing = inner["array"]
        text = f'{head}"metadata": {{"deep": {opening}{closing}}}}}'
    else:
        text = "".join(inner[shape])
    path = write(tmp_path, text)
    tracemalloc.start()
    message = refuse(path, layers)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == f"{NAME}.json: objects and arrays nest deeper than {MAX_DEPTH} levels, the limit for a config."
    assert peak < 64 * 2**20


def test_nesting_at_the_limit_is_read(valid, layers, tmp_path):
    data = valid.to_dict()
    data["metadata"] = {"deep": json.loads("[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2))}
    assert PrecisionConfig.load(write(tmp_path, json.dumps(data)), layers).metadata == data["metadata"]


@pytest.mark.parametrize("digits", [MAX_INT_DIGITS + 1, 5_000, 1_000_000])
@pytest.mark.parametrize("where", ["bits", "metadata", "schema_version"])
def test_huge_integers_are_refused(valid, layers, tmp_path, digits, where):
    number = "9" * digits
    field = {"bits": ("weight_bits", {TO_K: "@@"}), "metadata": ("metadata", {"big": "@@"})}.get(where, (where, "@@"))
    text = json.dumps(valid.to_dict() | dict([field])).replace('"@@"', f"-{number}")
    message = refuse(write(tmp_path, text), layers)
    assert message == f"{NAME}.json: an integer of {digits} digits (-{'9' * 19}...); integers have at most 32 digits."


def test_an_integer_of_32_digits_is_read(valid, layers, tmp_path):
    data = valid.to_dict() | {"metadata": {"seed": 10**31}}
    assert PrecisionConfig.load(write(tmp_path, json.dumps(data)), layers).metadata["seed"] == 10**31


def alias_bomb(levels: int = 9, width: int = 10, flat: bool = False) -> str:
    """The "billion laughs": each level lists the previous one ``width`` times (10**9 leaves at 9 levels)."""
    lols = ", ".join(['"lol"'] * width)
    lines = [f"model.a0: &a0 [{lols}]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"model.a{level}: &a{level} [{aliases}]")
    if flat:  # anchors on scalars only, the form a MixDQ yaml could take
        lines = ["model.a0: &a0 4"] + [f"model.a{i}: *a0" for i in range(1, width)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("bomb", [alias_bomb(), alias_bomb(flat=True), "x: &x [*x]\n", "*undefined\n"])
def test_yaml_aliases_are_refused_in_bounded_memory(layers, tmp_path, bomb):
    (tmp_path / "b.weight.yaml").write_text(bomb)
    (tmp_path / "b.act.yaml").write_text(bomb)
    tracemalloc.start()
    message = refuse(tmp_path / "b.weight.yaml", layers, name=f"{NAME}.weight.yaml")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "anchors and aliases (&, *) are not allowed" in message or "is not valid yaml" in message
    assert peak < 16 * 2**20


@pytest.mark.parametrize(
    "text, said",
    [
        ("model.conv_in: 4\n" * 2, "key 'model.conv_in' appears twice; keep one."),
        ("model.conv_in: [4]\n", "the value of 'model.conv_in' is a list at line 1, column 16"),
        ("model.conv_in: {a: 4}\n", "the value of 'model.conv_in' is a mapping"),
        ("? [a]\n: 4\n", "a key is a list"),
        ("model.conv_in: !!python/object/apply:os.system ['true']\n", "explicit yaml tag"),
        ("model.conv_in: !!int 4\n", "explicit yaml tag 'tag:yaml.org,2002:int' at line 1, column 16"),
        ("model.conv_in: 4\n---\nmodel.conv_in: 8\n", "more than one yaml document"),
        ("", "is empty"),
        ("4\n", "must map layer names to bits, got 4."),
        (f"model.conv_in: {'9' * 5000}\n", "is an integer of 5000 digits; integers have at most 32 digits."),
        ("model.conv_in: 4\n  x: 3\n", "is not valid yaml: mapping values are not allowed in this context at line 2"),
        ("\tmodel.conv_in: 4\n", "is not valid yaml: found character that cannot start any token at line 1"),
    ],
)
def test_malformed_yaml_is_refused(layers, tmp_path, text, said):
    weight, act = tmp_path / "c_weight.yaml", tmp_path / "c_act.yaml"
    weight.write_text(text)
    act.write_text("model.conv_in: 8\n")
    message = refuse(weight, layers, name=f"{NAME}_weight.yaml")
    assert message.startswith(f"{NAME}_weight.yaml") and said in message, message


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"format": 1, "format": 2}', "key 'format' appears twice in one object; keep one."),
        ('{"weight_bits": {"conv_in": 4, "conv_in": 8}}', "key 'conv_in' appears twice"),
        ("[NaN]", "NaN is not a JSON number"),
        ("[-Infinity]", "-Infinity is not a JSON number"),
        ("", "is not valid JSON: Expecting value at line 1, column 1."),
        ("\ufeff[1]", "a precision config must be a JSON object, got list."),
        ('{"format": "mixdq-studio/precision-config", "schema_version": 1, "weight_bit": {}}', "unknown key"),
    ],
)
def test_malformed_json_is_refused(layers, tmp_path, text, said):
    assert said in refuse(write(tmp_path, text), layers)


def test_duplicate_keys_never_let_the_last_one_win(valid, layers, tmp_path):
    text = valid.to_json().replace('"weight_bits": {', '"weight_bits": {"conv_in": 3}, "weight_bits": {', 1)
    assert (
        refuse(write(tmp_path, text), layers)
        == f"{NAME}.json: key 'weight_bits' appears twice in one object; keep one."
    )


@pytest.mark.parametrize(
    "name",
    ["conv_in\u2028x", "conv_in\nx", "c\u0000", "\ud800", "\u202econv_in", "conv_in\u200b", "😀" * 1000, "x" * 100_000],
)
def test_unicode_and_long_layer_names_stay_one_bounded_line(valid, layers, tmp_path, name):
    data = valid.to_dict()
    data["weight_bits"][name] = 4
    message = refuse(write(tmp_path, json.dumps(data)), layers)
    assert message.startswith(f"{NAME}.json: weight_bits: unknown layer ")
    message.encode("utf-8")  # printable everywhere: no lone surrogate reaches stderr


def test_a_unicode_file_name_is_named(valid, layers, tmp_path):
    path = tmp_path / "конфиг 😀.json"
    path.write_text(valid.to_json().replace('"weight_clip": "minmax"', '"weight_clip": "best"'))
    message = refuse(path, layers, name=path.name)
    assert message == "конфиг 😀.json: weight_clip 'best' not allowed; choose from ['minmax', 'mse']."


@pytest.mark.parametrize("suffix", [".json", ".weight.yaml"])
def test_a_file_over_the_size_cap_is_refused_unread(layers, tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    with path.open("wb") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk used
    (tmp_path / "huge.act.yaml").write_text("model.conv_in: 8\n")
    tracemalloc.start()
    message = refuse(path, layers, name=f"{NAME}{suffix}")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message.endswith(f"file {NAME}{suffix} is larger than 16 MB, the limit for a config.")
    assert peak < 2**20


def test_binary_and_non_regular_files(layers, tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b'{"a": "\xff\xfe"}')
    assert refuse(path, layers).endswith("is not a text file (not UTF-8 at byte 7).")
    with pytest.raises(ConfigError, match="^config /dev/null is not a regular file.$"):
        PrecisionConfig.load("/dev/null")
    assert refuse(tmp_path / "missing.json", layers) == f"config file not found: {NAME}.json"


def test_an_unreadable_file_is_a_config_error(layers, tmp_path, monkeypatch):
    path = write(tmp_path, "{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    assert refuse(path, layers) == f"config file {NAME}.json cannot be read: Permission denied."


# ---- which paths name a MixDQ yaml pair ----------------------------------------------------------------------------
def test_the_yaml_pair_rule(valid, layers, tmp_path):
    weight_yaml, act_yaml = valid.to_mixdq_yaml(layers)
    studio, cli = tmp_path / "studio", tmp_path / "cli"
    studio.mkdir(), cli.mkdir()
    (studio / "s.weight.yaml").write_text(weight_yaml)
    (studio / "s.act.yaml").write_text(act_yaml)
    (cli / "c_weight.yaml").write_text(weight_yaml)
    (cli / "c_act.yaml").write_text(act_yaml)
    for path in (studio / "s.weight.yaml", studio / "s.act.yaml", studio / "s", studio, cli / "c_act.yaml", cli / "c"):
        loaded = PrecisionConfig.load(path, layers)
        assert loaded.weight_bits[TO_K] == 2 and loaded.protected == ["conv_out"], path
    (cli / "d_weight.yaml").write_text(weight_yaml)
    (cli / "d_act.yaml").write_text(act_yaml)
    assert "holds 2 pairs (c_weight.yaml, d_weight.yaml)" in refuse(cli, layers, name="cli")
    (cli / "lone.weight.yaml").write_text(weight_yaml)
    assert refuse(cli / "lone.weight.yaml", layers, name="cli/lone.weight.yaml") == (
        "cli/lone.weight.yaml: its partner cli/lone.act.yaml is missing; a MixDQ yaml config is a weight and an "
        "activation file."
    )
    (cli / "other.yaml").write_text(weight_yaml)
    assert "is a pair of files named STEM.weight.yaml" in refuse(cli / "other.yaml", layers, name="other.yaml")
    assert refuse(tmp_path / "empty", layers, name="empty") == "config file not found: empty"


def test_round_trip_json_and_yaml_pair_give_one_config(valid, layers, tmp_path):
    """What the project exports (JSON, the yaml pair) loads back through the one loader as the same config."""
    valid.save(tmp_path / "cfg.json")
    weight_yaml, act_yaml = valid.to_mixdq_yaml(layers)
    (tmp_path / "cfg.weight.yaml").write_text(weight_yaml)
    (tmp_path / "cfg.act.yaml").write_text(act_yaml)
    from_json = PrecisionConfig.load(tmp_path / "cfg.json", layers)
    from_yaml = PrecisionConfig.load(tmp_path / "cfg", layers, model_id="tiny")
    assert from_json == valid
    for info in layers:
        assert from_yaml.layer_weight_bits(info.name) == valid.layer_weight_bits(info.name), info.name
        assert from_yaml.layer_act_bits(info.name) == valid.layer_act_bits(info.name), info.name
    assert from_yaml.protected == valid.protected and from_yaml.model_id == "tiny"
    assert from_yaml.fingerprint == from_json.fingerprint == inventory_fingerprint(layers)


# ---- a config for another model ---------------------------------------------------------------------------------
def test_a_json_for_another_model_names_both_models(valid, tmp_path):
    turbo = list(sdxl_turbo_inventory().layers)
    message = refuse(valid.save(tmp_path / "tiny.json"), turbo, name="tiny.json")
    assert message == (
        f"tiny.json: this config was made for another model (tiny, architecture {valid.fingerprint}); this is tiny "
        f"(architecture {inventory_fingerprint(turbo)}, {len(turbo)} layers)."
    )


def test_a_yaml_pair_for_another_model_says_so(valid, layers, tmp_path):
    turbo = list(sdxl_turbo_inventory().layers)
    turbo_config = PrecisionConfig.uniform(turbo, 4, 8)
    weight_yaml, act_yaml = turbo_config.to_mixdq_yaml(turbo)
    (tmp_path / "t_weight.yaml").write_text(weight_yaml)
    (tmp_path / "t_act.yaml").write_text(act_yaml)
    message = refuse(tmp_path / "t", layers, name="turbo")
    unknown = {i.name for i in turbo} - {i.name for i in layers}
    assert message.startswith("turbo_weight.yaml + turbo_act.yaml: weight_bits: unknown layer 'down_blocks.")
    assert f"; {2 * len(unknown)} of the {2 * len(turbo)} layer entries are not layers of this UNet, " in message
    assert message.endswith(
        f"so the config was made for another model (model not recorded); this is tiny (architecture "
        f"{inventory_fingerprint(layers)}, {len(layers)} layers)."
    )
