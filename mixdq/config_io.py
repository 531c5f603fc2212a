"""Bounded reading of config files that may be hostile: size, nesting, integer length, duplicate keys and
yaml aliases are refused before they can cost time or memory, and every refusal is one short line.

Used by :mod:`mixdq.config` for every path a config enters through (CLI, studio, library)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# A config file larger than this is refused before it is read (an SDXL config is about 100 KB).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# JSON objects and arrays nest at most this deep (a PrecisionConfig with its allocation metadata uses 5).
MAX_DEPTH = 64
# Integers have at most this many digits (bits, sizes and seeds all fit; Python refuses > 4300 digits itself).
MAX_INT_DIGITS = 32
# A value quoted in a message is cut to this many characters, and a whole message to MAX_MESSAGE_CHARS.
MAX_QUOTE_CHARS = 80
MAX_MESSAGE_CHARS = 600


class ConfigError(ValueError):
    """A precision config that cannot be read or applied; one line naming the file, the entry and the defect.

    The message is made printable and single-line and cut to :data:`MAX_MESSAGE_CHARS`, whatever it quotes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def quote(value: Any) -> str:
    """``repr(value)`` cut to :data:`MAX_QUOTE_CHARS`, built without expanding a huge or deep value first."""
    if isinstance(value, (dict, list, tuple)):
        return f"<a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} entries>"
    if isinstance(value, int) and value.bit_length() > 256:  # repr() of a 5,000-digit int raises
        return "<an integer over 2**256>"
    if isinstance(value, str) and len(value) > MAX_QUOTE_CHARS:
        return repr(value[:MAX_QUOTE_CHARS]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else text[:MAX_QUOTE_CHARS] + "..."


def shorten(text: str) -> str:
    """``text`` cut to :data:`MAX_QUOTE_CHARS` (for names shown without quotes, such as a model id)."""
    return text if len(text) <= MAX_QUOTE_CHARS else text[:MAX_QUOTE_CHARS] + "..."


def _one_line(message: str) -> str:
    message = message[: 4 * MAX_MESSAGE_CHARS]
    message = "".join(c if c.isprintable() else (" " if c.isspace() else repr(c)[1:-1]) for c in message)
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def read_text(path: Path, name: str, what: str) -> str:
    """The file's text, refusing a missing or non-regular file, one over :data:`MAX_CONFIG_BYTES` (checked before
    reading, and the read itself is capped) and one that is not UTF-8. ``name`` is the file as the user knows it."""
    if not path.is_file():
        missing = not path.exists()
        raise ConfigError(f"{what} file not found: {name}" if missing else f"{what} {name} is not a regular file.")
    too_big = f"{what} file {name} is larger than {MAX_CONFIG_BYTES // 2**20} MB, the limit for a config."
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    try:
        with path.open("rb") as handle:
            data = handle.read(size + 1)  # not read(cap): that would allocate the whole cap for any file
            if len(data) > size:  # it grew since stat (or is a /proc file of size 0): read on, within the cap
                data += handle.read(MAX_CONFIG_BYTES + 1 - len(data))
    except OSError as err:
        raise ConfigError(f"{what} file {name} cannot be read: {err.strerror or err}.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} file {name} is not a text file (not UTF-8 at byte {err.start}).") from None


# ---- JSON ------------------------------------------------------------------------------------------------
def parse_json(text: str, source: str) -> Any:
    """JSON with duplicate keys, NaN/Infinity, integers over :data:`MAX_INT_DIGITS` digits and nesting deeper
    than :data:`MAX_DEPTH` refused (each as a :class:`ConfigError` naming ``source``)."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) < len(pairs):
            seen: set[str] = set()
            duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ConfigError(f"{source}: key {quote(duplicate)} appears twice in one object; keep one.")
        return result

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise ConfigError(
                f"{source}: an integer of {len(digits.lstrip('-'))} digits ({digits[:20]}...); "
                f"integers have at most {MAX_INT_DIGITS} digits."
            )
        return int(digits)

    def no_constant(name: str) -> None:
        raise ConfigError(f"{source}: {name} is not a JSON number; write a finite number.")

    try:
        data = json.loads(text, object_pairs_hook=unique_keys, parse_int=bounded_int, parse_constant=no_constant)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from None
    except RecursionError:
        raise _too_deep(source) from None
    if text.count("[") + text.count("{") > MAX_DEPTH:  # fewer brackets cannot nest too deep
        _check_depth(text, source)
    return data


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _check_depth(text: str, source: str) -> None:
    """Refuse JSON text (already parsed) that nests deeper than :data:`MAX_DEPTH`, at C speed: with strings
    and everything but brackets removed, each pass deletes the innermost empty pairs, one level of nesting."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    for _ in range(MAX_DEPTH):
        brackets = _EMPTY_PAIR.sub("", brackets)
        if not brackets:
            return
    raise _too_deep(source)


def _too_deep(source: str) -> ConfigError:
    return ConfigError(f"{source}: objects and arrays nest deeper than {MAX_DEPTH} levels, the limit for a config.")


# ---- MixDQ yaml --------------------------------------------------------------------------------------------
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_TAG = "tag:yaml.org,2002:int"


def parse_flat_yaml(text: str, source: str) -> dict[str, Any]:
    """A yaml document that is one flat mapping of plain keys to scalars, read event by event.

    MixDQ's yaml files are exactly that, so anything else is refused as soon as it appears: aliases and anchors
    (the "billion laughs" expansion), nested collections (so nesting is bounded at one level), explicit tags,
    duplicate keys, integers over :data:`MAX_INT_DIGITS` digits and a second document. Values are the scalars
    yaml's safe loader makes of them (``4`` an int, ``4.0`` a float, ``true`` a bool)."""
    loader = _YAML_LOADER(text)
    try:
        return _flat_mapping(loader, source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid yaml: {_yaml_problem(err)}") from None
    finally:
        loader.dispose()


def _flat_mapping(loader: Any, source: str) -> dict[str, Any]:
    def next_event() -> yaml.Event:
        event = loader.get_event()
        if getattr(event, "anchor", None) is not None or isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"{source}: yaml anchors and aliases (&, *) are not allowed in a MixDQ config{_at(event)}."
            )
        return event

    def scalar(event: yaml.Event, what: Callable[[], str]) -> Any:
        implicit = getattr(event, "implicit", True)  # a tuple for scalars, a bool for collections
        if getattr(event, "tag", None) is not None and not (any(implicit) if isinstance(implicit, tuple) else implicit):
            raise ConfigError(f"{source}: explicit yaml tag {quote(event.tag)}{_at(event)} is not allowed.")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            kind = "mapping" if isinstance(event, yaml.MappingStartEvent) else "list"
            raise ConfigError(f"{source}: {what()} is a {kind}{_at(event)}; MixDQ yaml maps layer names to bits.")
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _INT_TAG and len(event.value) > MAX_INT_DIGITS:
            raise ConfigError(
                f"{source}: {what()} is an integer of {len(event.value)} digits; integers have at most "
                f"{MAX_INT_DIGITS} digits."
            )
        # The tag's own constructor, not construct_object, whose cache would keep every node of the file.
        return loader.yaml_constructors[tag](loader, yaml.ScalarNode(tag, event.value))

    for expected in (yaml.StreamStartEvent, yaml.DocumentStartEvent):
        event = next_event()
        if not isinstance(event, expected):
            raise ConfigError(f"{source} is empty; MixDQ yaml maps layer names to bits.")
    event = next_event()
    if not isinstance(event, yaml.MappingStartEvent):
        kind = "a list" if isinstance(event, yaml.SequenceStartEvent) else quote(scalar(event, lambda: "the document"))
        raise ConfigError(f"{source} must map layer names to bits, got {kind}.")
    result: dict[str, Any] = {}
    while not isinstance(event := next_event(), yaml.MappingEndEvent):
        key = scalar(event, lambda: "a key")
        value = scalar(next_event(), lambda key=key: f"the value of {quote(key)}")  # built on error only
        if not isinstance(key, str):
            key = str(key)
        if key in result:
            raise ConfigError(f"{source}: key {quote(key)} appears twice; keep one.")
        result[key] = value
    next_event()  # the document's end; a second document follows only where one was written
    if not isinstance(next_event(), yaml.StreamEndEvent):
        raise ConfigError(f"{source} holds more than one yaml document; a MixDQ config is one mapping.")
    return result


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}."
    return str(err)


# ---- which paths name a MixDQ yaml pair ------------------------------------------------------------------------
_PAIR_NAME = re.compile(r"(?P<stem>.+)(?P<sep>[._])(?P<role>weight|act)\.(?P<ext>ya?ml)")
_PAIR_RULE = "STEM.weight.yaml + STEM.act.yaml, or STEM_weight.yaml + STEM_act.yaml"


def mixdq_yaml_pair(path: Path, name: str | None = None) -> tuple[tuple[Path, str], tuple[Path, str]] | None:
    """((weight file, its name), (activation file, its name)) when ``path`` names a MixDQ yaml pair, else None.

    The rule: ``path`` is either file of a pair named ``STEM_weight.yaml`` + ``STEM_act.yaml`` (what
    :meth:`mixdq.config.PrecisionConfig.save_mixdq_yaml` writes) or ``STEM.weight.yaml`` + ``STEM.act.yaml`` (the
    studio's earlier export), ``.yml`` too; or the
    ``STEM`` itself when no file of that name exists; or a folder holding exactly one such pair. Any other
    ``.yaml`` / ``.yml`` file is refused (a MixDQ config needs both files); every other path is JSON. ``name`` is
    how the user knows ``path``; the partner's name is derived from it.
    """
    name = name or str(path)
    match = _PAIR_NAME.fullmatch(path.name)
    if match:
        return _pair_of(path, name, match)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise ConfigError(
            f"{name}: a MixDQ yaml config is a pair of files named {_PAIR_RULE}; pass either file of the pair "
            "(or load a lone weight yaml with PrecisionConfig.load_mixdq_yaml)."
        )
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if (m := _PAIR_NAME.fullmatch(p.name)) and m["role"] == "weight")
        pairs = [p for p in weights if _partner(p).is_file()]
        if len(pairs) != 1:
            found = f"{len(pairs)} pairs ({', '.join(p.name for p in pairs[:3])})" if pairs else "no pair"
            raise ConfigError(f"folder {name} holds {found} of MixDQ yaml files named {_PAIR_RULE}; name one file.")
        return _pair_of(pairs[0], f"{name}/{pairs[0].name}", _PAIR_NAME.fullmatch(pairs[0].name))
    if not path.exists():
        for sep in "._":
            weight = path.with_name(f"{path.name}{sep}weight.yaml")
            if weight.is_file() and _partner(weight).is_file():
                return _pair_of(weight, f"{name}{sep}weight.yaml", _PAIR_NAME.fullmatch(weight.name))
    return None


def _partner(path: Path) -> Path:
    match = _PAIR_NAME.fullmatch(path.name)
    return path.with_name(_swap_role(match))


def _swap_role(match: re.Match) -> str:
    other = "act" if match["role"] == "weight" else "weight"
    return f"{match['stem']}{match['sep']}{other}.{match['ext']}"


def _pair_of(path: Path, name: str, match: re.Match) -> tuple[tuple[Path, str], tuple[Path, str]]:
    if not path.is_file():
        raise ConfigError(f"MixDQ yaml file not found: {name}")
    partner = path.with_name(_swap_role(match))
    name_match = _PAIR_NAME.fullmatch(Path(name).name)
    partner_name = str(Path(name).with_name(_swap_role(name_match))) if name_match else str(partner)
    if not partner.is_file():
        raise ConfigError(
            f"{name}: its partner {partner_name} is missing; a MixDQ yaml config is a weight and an activation file."
        )
    files = ((path, name), (partner, partner_name))
    return files if match["role"] == "weight" else (files[1], files[0])
