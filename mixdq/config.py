"""PrecisionConfig: which bits each UNet layer gets. Data, not code: it round-trips to JSON and to
the MixDQ authors' yaml format, and is validated against a model's layer inventory before use."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixdq.config_io import ConfigError, mixdq_yaml_pair, parse_flat_yaml, parse_json, quote, read_text, shorten
from mixdq.inventory import LayerInfo, inventory_fingerprint

# Candidate bit-widths, the single source of truth for every module that chooses bits.
WEIGHT_BITS: tuple[int, ...] = (2, 4, 8)
# How weight scales are chosen (mixdq.quant.primitives): MixDQ's min-max, or per-row MSE clipping.
WEIGHT_CLIPS: tuple[str, ...] = ("minmax", "mse")
# Which A8 linear layers run FP8 e4m3 (see PrecisionConfig.with_run_options): none, the W8A8 ones, every A8 one.
# The value is with_fp8_linears' ``low_bit`` (None: no FP8).
FP8_CHOICES: dict[str, bool | None] = {"none": None, "w8a8": False, "a8": True}
ACT_BITS: tuple[int, ...] = (4, 8)
# In MixDQ yaml files a layer kept in floating point is written with this bit-width (and read at 16 or 32).
MIXDQ_YAML_FP_BITS = 16
MIXDQ_YAML_FP_READ: tuple[int, ...] = (MIXDQ_YAML_FP_BITS, 32)
# MixDQ's yaml keys carry the UNet's attribute name as prefix.
MIXDQ_YAML_PREFIX = "model."

SCHEMA_VERSION = 1
FORMAT_NAME = "mixdq-studio/precision-config"
BUDGET_UNITS: tuple[str, ...] = ("bits", "mb")
BUDGET_KEY = "budget"  # where a config's metadata records the budget it was allocated for


@dataclass(frozen=True)
class Budget:
    """A weight budget as the user gave it: average bits, or MB of the whole UNet's weights (1 MB = 1e6 bytes).

    Kept in the unit it was asked in, so a config reloaded later shows the request, not a rounded conversion.
    """

    value: float
    unit: str = "bits"

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or self.unit not in BUDGET_UNITS:
            raise ValueError(f"budget unit {quote(self.unit)} is not one of {list(BUDGET_UNITS)}.")
        if not _positive_finite(self.value):
            raise ValueError(f"budget value {quote(self.value)} must be a positive finite number of {self.unit}.")

    def to_dict(self) -> dict[str, Any]:
        return {"value": float(self.value), "unit": self.unit}

    @classmethod
    def from_dict(cls, data: Any) -> Budget:
        """The budget a :meth:`to_dict` mapping describes; :class:`ConfigError` names what is wrong."""
        if not isinstance(data, dict) or set(data) != {"value", "unit"}:
            raise ConfigError(f"metadata.{BUDGET_KEY} must be an object with 'value' and 'unit', got {quote(data)}.")
        try:
            return cls(data["value"], data["unit"])
        except ValueError as err:
            raise ConfigError(f"metadata.{BUDGET_KEY}: {err}") from None


@dataclass
class PrecisionConfig:
    """Per-layer weight and activation bits for a UNet.

    A layer missing from ``weight_bits`` keeps FP16 weights; one missing from ``act_bits`` keeps
    FP16 inputs. ``protected`` layers stay entirely in FP16 whatever the two maps say (MixDQ keeps
    the ~1% most activation-sensitive layers this way). ``fp8`` lists A8 linear layers whose 8-bit sides use
    the FP8 e4m3 format (:mod:`kernels.fp8`) instead of int8: a W8A8 layer's weights and activations, a W4A8 /
    W2A8 layer's activations (its integer weight codes are exact in e4m3, so they run on FP8 tensor cores as
    they are). cuBLAS FP8 is the fastest 8-bit GEMM on Hopper/Ada GPUs, and fake quantization simulates the
    same grid, so quality is measured for what runs (see :meth:`with_fp8_linears`). ``fingerprint`` identifies
    the architecture the config was made for (see :func:`mixdq.inventory.inventory_fingerprint`).
    ``weight_clip`` chooses how weight scales are set: ``"minmax"`` (MixDQ: each row's largest weight exact)
    or ``"mse"`` (each row's scale clipped to the least squared rounding error; much better at 2 bits, same
    kernels and memory).
    """

    weight_bits: dict[str, int] = field(default_factory=dict)
    act_bits: dict[str, int] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)
    weight_clip: str = "minmax"
    model_id: str = ""
    fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        layers: list[LayerInfo],
        weight_bits: int | None,
        act_bits: int | None,
        protected: list[str] | tuple[str, ...] = (),
        model_id: str = "",
    ) -> PrecisionConfig:
        """Every layer at the same bits (``None`` keeps that side in FP16)."""
        config = cls(
            weight_bits={i.name: weight_bits for i in layers} if weight_bits is not None else {},
            act_bits={i.name: act_bits for i in layers} if act_bits is not None else {},
            protected=list(protected),
            model_id=model_id,
            fingerprint=inventory_fingerprint(layers),
        )
        config.validate(layers)
        return config

    # ---- queries --------------------------------------------------------------------------------
    @property
    def budget(self) -> Budget | None:
        """The weight budget this config was allocated for (``None``: not recorded, e.g. hand-made or older)."""
        data = self.metadata.get(BUDGET_KEY)
        return None if data is None else Budget.from_dict(data)

    def layer_weight_bits(self, name: str) -> int | None:
        """Bits of this layer's weights, ``None`` for FP16."""
        return None if name in self.protected else self.weight_bits.get(name)

    def layer_act_bits(self, name: str) -> int | None:
        """Bits of this layer's input activations, ``None`` for FP16."""
        return None if name in self.protected else self.act_bits.get(name)

    def layer_fp8(self, name: str) -> bool:
        """True when this layer's 8-bit sides are FP8 e4m3 rather than int8."""
        return name in self.fp8 and name not in self.protected

    def with_fp8_linears(self, layers: list[LayerInfo], low_bit: bool = False) -> PrecisionConfig:
        """A copy in which every W8A8 linear layer runs FP8 e4m3 (convs and other bits keep their format).

        ``low_bit``: the W4A8 / W2A8 linear layers too (e4m3 activations, their integer weights unchanged).
        """
        fp8 = [
            i.name
            for i in layers
            if i.kind == "linear"
            and self.layer_act_bits(i.name) == 8
            and self.layer_weight_bits(i.name) in (WEIGHT_BITS if low_bit else (8,))
        ]
        config = dataclasses.replace(self, fp8=fp8)
        config.validate(layers)
        return config

    def with_run_options(
        self, layers: list[LayerInfo], weight_clip: str = "minmax", fp8: str = "none"
    ) -> PrecisionConfig:
        """A copy whose bits run with ``weight_clip`` scales (one of :data:`WEIGHT_CLIPS`) and the FP8 choice
        ``fp8`` (a key of :data:`FP8_CHOICES`); the bits themselves are unchanged. The CLI's ``--weight-clip`` /
        ``--fp8`` and the studio's run options both mean this call."""
        if weight_clip not in WEIGHT_CLIPS:
            raise ConfigError(f"weight_clip {quote(weight_clip)} not allowed; choose from {list(WEIGHT_CLIPS)}.")
        if fp8 not in FP8_CHOICES:
            raise ConfigError(f"fp8 {quote(fp8)} not allowed; choose from {list(FP8_CHOICES)}.")
        config = dataclasses.replace(self, weight_clip=weight_clip, fp8=[])
        low_bit = FP8_CHOICES[fp8]
        return config if low_bit is None else config.with_fp8_linears(layers, low_bit=low_bit)

    def validate(self, layers: list[LayerInfo], model_id: str = "", source: str | None = None) -> None:
        """Raise :class:`ConfigError` naming the first entry that does not fit ``layers``.

        ``model_id`` names the loaded model in the message when the config was made for another one; ``source``
        (the config's file) starts every message.
        """
        try:
            self._validate(layers, model_id)
        except ConfigError as err:
            if source is None:
                raise
            raise ConfigError(f"{source}: {err}") from None

    def _validate(self, layers: list[LayerInfo], model_id: str) -> None:
        fingerprint = inventory_fingerprint(layers)
        this = f"this is {shorten(model_id) or 'the loaded model'} (architecture {fingerprint}, {len(layers)} layers)"
        made_for = shorten(self.model_id) or "model not recorded"
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise ConfigError(
                f"this config was made for another model ({made_for}, architecture {shorten(str(self.fingerprint))}); "
                f"{this}."
            )
        known = {i.name for i in layers}
        listed = {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "protected": self.protected,
            "fp8": self.fp8,
        }
        unknown = [(what, name) for what, names in listed.items() for name in names if name not in known]
        named = sum(map(len, listed.values()))
        if len(unknown) >= 2 and 2 * len(unknown) > named:  # most names unknown: not a typo, another model
            what, name = unknown[0]
            raise ConfigError(
                f"{what}: unknown layer {quote(name)}; {len(unknown)} of the {named} layer entries are not layers of "
                f"this UNet, so the config was made for another model ({made_for}); {this}."
            )
        for what, entries, candidates in (
            ("weight_bits", self.weight_bits, WEIGHT_BITS),
            ("act_bits", self.act_bits, ACT_BITS),
        ):
            for name, bits in entries.items():
                if name not in known:
                    raise ConfigError(f"{what}: unknown layer {quote(name)} (not a Linear/Conv2d of this UNet).")
                _check_bits(what, name, bits, candidates)
        for name in self.protected:
            if name not in known:
                raise ConfigError(f"protected: unknown layer {quote(name)} (not a Linear/Conv2d of this UNet).")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise ConfigError(f"weight_clip {quote(self.weight_clip)} not allowed; choose from {list(WEIGHT_CLIPS)}.")
        kinds = {i.name: i.kind for i in layers}
        for name in self.fp8:
            if name not in known:
                raise ConfigError(f"fp8: unknown layer {quote(name)} (not a Linear/Conv2d of this UNet).")
            if kinds[name] != "linear":
                raise ConfigError(
                    f"fp8: layer {quote(name)} is a {kinds[name]}; FP8 e4m3 is offered for linear layers only."
                )
            bits = (self.layer_weight_bits(name), self.layer_act_bits(name))
            if name not in self.protected and (bits[0] is None or bits[1] != 8):
                raise ConfigError(
                    f"fp8: layer {quote(name)} is at W{bits[0] or 16}A{bits[1] or 16}; FP8 e4m3 replaces int8 in "
                    "layers with quantized weights and 8-bit activations only. Remove it from 'fp8' or give it 8-bit "
                    "activations."
                )

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "weight_bits": dict(self.weight_bits),
            "act_bits": dict(self.act_bits),
            "protected": list(self.protected),
            "fp8": list(self.fp8),
            "weight_clip": self.weight_clip,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PrecisionConfig:
        """The config a :meth:`to_dict` mapping describes; every key and value is checked for its type, and bits
        for their candidates (the layers themselves are checked against a model by :meth:`validate`)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a precision config must be a JSON object, got {type(data).__name__}.")
        if data.get("format") != FORMAT_NAME:
            raise ConfigError(
                f"not a MixDQ Studio precision config: 'format' is {quote(data.get('format'))}, "
                f"expected {FORMAT_NAME!r}."
            )
        version = data.get("schema_version")
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ConfigError(
                f"unsupported schema_version {quote(version)}; this version of MixDQ Studio reads {SCHEMA_VERSION}."
            )
        unknown = [key for key in data if key not in _JSON_KEYS]
        if unknown:
            raise ConfigError(f"unknown key {quote(unknown[0])}; a precision config has {list(_JSON_KEYS)}.")
        for key, kinds in _JSON_TYPES.items():
            if key in data and not isinstance(data[key], kinds):
                expected = " or ".join(_json_type(kind()) for kind in kinds)
                raise ConfigError(f"{quote(key)} must be a JSON {expected}, got {_json_type(data[key])}.")
        for key, candidates in (("weight_bits", WEIGHT_BITS), ("act_bits", ACT_BITS)):
            for name, bits in data.get(key, {}).items():
                _check_bits(key, name, bits, candidates)
        for key in ("protected", "fp8"):
            for index, name in enumerate(data.get(key, [])):
                if not isinstance(name, str):
                    raise ConfigError(f"{key}: entry {index} is {quote(name)}; expected a layer name (a string).")
        if data.get("metadata", {}).get(BUDGET_KEY) is not None:
            Budget.from_dict(data["metadata"][BUDGET_KEY])
        return cls(
            weight_bits=dict(data.get("weight_bits", {})),
            act_bits=dict(data.get("act_bits", {})),
            protected=list(data.get("protected", [])),
            fp8=list(data.get("fp8", [])),
            weight_clip=data.get("weight_clip", "minmax"),
            model_id=data.get("model_id", ""),
            fingerprint=data.get("fingerprint"),
            metadata=dict(data.get("metadata", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "the config text") -> PrecisionConfig:
        """Parse JSON text within the bounds of :func:`mixdq.config_io.parse_json`; errors start with ``source``."""
        data = parse_json(text, source)
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (``.json``) and return the path."""
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        layers: list[LayerInfo] | None = None,
        *,
        name: str | None = None,
        model_id: str = "",
    ) -> PrecisionConfig:
        """Read a config file, the one entry point for the CLI, the studio and the library.

        ``path`` is a JSON config (as :meth:`save` and the studio write it) or names a MixDQ yaml pair (as
        :meth:`to_mixdq_yaml` is exported; :func:`mixdq_yaml_pair` gives the rule). Files are read within the
        bounds of :mod:`mixdq.config_io` (size, nesting, integer length, duplicate keys, no yaml aliases).
        ``name`` is the file as the user knows it (an upload's own name, not its temporary path); every
        :class:`ConfigError` names it. With ``layers`` the config is also validated for that model, which
        ``model_id`` names.
        """
        path = Path(path)
        name = name or str(path)
        pair = mixdq_yaml_pair(path, name)
        if pair is not None:
            (weight, weight_name), (act, act_name) = pair
            return cls.load_mixdq_yaml(weight, act, layers, model_id, names=(weight_name, act_name))
        config = cls.from_json(read_text(path, name, "config"), source=name)
        if layers is not None:
            config.validate(layers, model_id, source=name)
        return config

    # ---- MixDQ yaml ---------------------------------------------------------------------------
    def to_mixdq_yaml(self, layers: list[LayerInfo]) -> tuple[str, str]:
        """(weight yaml, activation yaml) in the MixDQ authors' format: ``model.<layer>: bits``.

        Layers kept in FP16 (protected, or absent from a map) are written as 16 bits. MixDQ's format has no
        FP8, so a config with ``fp8`` layers is refused rather than exported as int8.
        """
        if self.weight_clip != "minmax":
            raise ConfigError(
                f"MixDQ's yaml format holds bits only and its code uses min-max weight scales; this config uses "
                f"weight_clip={self.weight_clip!r}. Export it as JSON."
            )
        if self.fp8:
            raise ConfigError(
                f"MixDQ's yaml format has no FP8 e4m3; this config runs {len(self.fp8)} layers in FP8. Export it as "
                "JSON, or clear its 'fp8' list to export the int8 equivalent."
            )
        weight = {MIXDQ_YAML_PREFIX + i.name: self.layer_weight_bits(i.name) or MIXDQ_YAML_FP_BITS for i in layers}
        act = {MIXDQ_YAML_PREFIX + i.name: self.layer_act_bits(i.name) or MIXDQ_YAML_FP_BITS for i in layers}
        return yaml.safe_dump(weight, sort_keys=False), yaml.safe_dump(act, sort_keys=False)

    def save_mixdq_yaml(self, folder: str | Path, stem: str, layers: list[LayerInfo]) -> tuple[Path, Path]:
        """Write :meth:`to_mixdq_yaml` as ``STEM_weight.yaml`` and ``STEM_act.yaml`` in ``folder`` (the one naming
        scheme of the CLI's ``--yaml-out`` and the studio's export; :meth:`load` reads the pair back) and return
        the two paths. Raises :class:`ConfigError` before writing anything when the format cannot say the config."""
        weight_yaml, act_yaml = self.to_mixdq_yaml(layers)
        paths = mixdq_yaml_paths(folder, stem)
        for path, text in zip(paths, (weight_yaml, act_yaml), strict=True):
            path.write_text(text)
        return paths

    @classmethod
    def load_mixdq_yaml(
        cls,
        weight_path: str | Path,
        act_path: str | Path | None = None,
        layers: list[LayerInfo] | None = None,
        model_id: str = "",
        names: tuple[str, str] | None = None,
    ) -> PrecisionConfig:
        """Load MixDQ-format yaml files (see :meth:`from_mixdq_yaml`); ``names`` are the files as the user knows
        them (default: their paths)."""
        names = names or (str(weight_path), str(act_path))
        weight_text = read_text(Path(weight_path), names[0], "MixDQ weight yaml")
        act_text = read_text(Path(act_path), names[1], "MixDQ activation yaml") if act_path is not None else None
        return cls.from_mixdq_yaml(weight_text, act_text, layers, model_id, sources=names)

    @classmethod
    def from_mixdq_yaml(
        cls,
        weight_yaml: str,
        act_yaml: str | None = None,
        layers: list[LayerInfo] | None = None,
        model_id: str = "",
        sources: tuple[str, str] = ("the weight yaml", "the activation yaml"),
    ) -> PrecisionConfig:
        """Load MixDQ-format yaml (weight bits, optionally activation bits).

        A layer at 16 (or 32) bits in both files is protected; at 16 in one file it keeps that side
        in FP16. Bits follow the JSON rule (integers, not ``4.0`` or ``true``) plus those two FP values. With
        ``layers`` the result is validated and fingerprinted for that model (named by ``model_id``). Errors
        start with the file's name from ``sources`` (weight, activation).
        """
        weight_map = _parse_mixdq_yaml(weight_yaml, sources[0], WEIGHT_BITS)
        act_map = _parse_mixdq_yaml(act_yaml, sources[1], ACT_BITS) if act_yaml is not None else {}
        fp_weight = {n for n, b in weight_map.items() if b >= MIXDQ_YAML_FP_BITS}
        fp_act = {n for n, b in act_map.items() if b >= MIXDQ_YAML_FP_BITS}
        protected = sorted(fp_weight & fp_act) if act_yaml is not None else []
        config = cls(
            weight_bits={n: b for n, b in weight_map.items() if n not in fp_weight},
            act_bits={n: b for n, b in act_map.items() if n not in fp_act},
            protected=protected,
        )
        if layers is not None:  # before the model id is set: MixDQ's yaml does not say which model it was made for
            config.validate(layers, model_id, source=" + ".join(sources[: 1 if act_yaml is None else 2]))
            config.fingerprint = inventory_fingerprint(layers)
        config.model_id = model_id
        return config


def mixdq_yaml_paths(folder: str | Path, stem: str) -> tuple[Path, Path]:
    """(weight, activation) yaml paths of the pair :meth:`PrecisionConfig.save_mixdq_yaml` writes."""
    folder = Path(folder)
    return folder / f"{stem}_weight.yaml", folder / f"{stem}_act.yaml"


_JSON_KEYS: tuple[str, ...] = tuple(PrecisionConfig().to_dict())
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "weight_bits": (dict,),
    "act_bits": (dict,),
    "protected": (list,),
    "fp8": (list,),
    "weight_clip": (str,),
    "model_id": (str,),
    "fingerprint": (str, type(None)),
    "metadata": (dict,),
}


def _positive_finite(value: Any) -> bool:
    """A JSON number in (0, inf): ``true`` is no number, and an integer past float range is no finite budget."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_bits(where: str, name: str, bits: Any, allowed: tuple[int, ...]) -> None:
    """The one rule for a bit value, in JSON and in yaml: an integer among ``allowed`` (``4.0`` and ``true`` are
    not integers here, whatever Python's ``==`` says)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ConfigError(f"{where}: layer {quote(name)} has bits {quote(bits)}; allowed: {list(allowed)}.")


def _parse_mixdq_yaml(text: str, source: str, candidates: tuple[int, ...]) -> dict[str, int]:
    """``{layer name without 'model.': bits}`` from MixDQ yaml text."""
    result: dict[str, int] = {}
    for name, bits in parse_flat_yaml(text, source).items():
        if not name.startswith(MIXDQ_YAML_PREFIX):
            raise ConfigError(
                f"{source}: key {quote(name)} lacks the {MIXDQ_YAML_PREFIX!r} prefix of MixDQ layer names."
            )
        _check_bits(source, name, bits, candidates + MIXDQ_YAML_FP_READ)
        result[name[len(MIXDQ_YAML_PREFIX) :]] = bits
    return result
