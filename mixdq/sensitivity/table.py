"""The tidy sensitivity table: one row per layer × bit × target × metric.

Sweeps on our own model and the published SDXL-Turbo data both end up in this shape, so the
allocator, the studio heatmaps and the CSV cache need to know only one format. Higher ``value``
always means less damage (SQNR in dB, SSIM in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mixdq.inventory import LayerInfo

COLUMNS: tuple[str, ...] = ("layer", "group", "kind", "block", "size", "bit", "target", "metric", "value")
TARGETS: tuple[str, ...] = ("weight", "act")
METRICS: tuple[str, ...] = ("sqnr", "ssim")
GROUPS: tuple[str, ...] = ("content", "quality")
# MixDQ's metric decoupling: content layers are judged by image SSIM, quality layers by UNet-output SQNR.
GROUP_METRIC: dict[str, str] = {"content": "ssim", "quality": "sqnr"}
# MixDQ keeps the ~1% most activation-sensitive layers in FP16 (see select_protected).
PROTECTED_SHARE = 0.01


class SensitivityTableError(ValueError):
    """A sensitivity table the allocator cannot use; the message names the offending layer or column."""


def validate_table(table: pd.DataFrame) -> pd.DataFrame:
    """Return ``table`` with canonical dtypes, or raise :class:`SensitivityTableError`.

    Checks what would silently corrupt an allocation: missing columns, unknown categories,
    NaN/inf values, non-positive sizes, duplicate rows and sizes that differ between a layer's rows.
    """
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise SensitivityTableError(f"sensitivity table lacks columns {missing}; required: {list(COLUMNS)}.")
    table = table.loc[:, list(COLUMNS)].reset_index(drop=True)
    for column, allowed in (("target", TARGETS), ("metric", METRICS), ("group", GROUPS)):
        bad = table.loc[~table[column].isin(allowed), column]
        if len(bad):
            layer = table.loc[bad.index[0], "layer"]
            raise SensitivityTableError(f"layer {layer!r}: {column} {bad.iloc[0]!r} is not one of {list(allowed)}.")
    for column in ("value", "size", "bit"):
        numbers = pd.to_numeric(table[column], errors="coerce").astype(float)
        bad = ~np.isfinite(numbers.to_numpy())
        if bad.any():
            row = table.loc[np.flatnonzero(bad)[0]]
            raise SensitivityTableError(
                f"layer {row['layer']!r} ({row['target']} {row['metric']} at {row['bit']} bits) has "
                f"{column} {row[column]!r}; every {column} must be a finite number."
            )
        table[column] = numbers
    table["bit"] = table["bit"].astype(int)
    nonpositive = table.loc[table["size"] <= 0]
    if len(nonpositive):
        row = nonpositive.iloc[0]
        raise SensitivityTableError(f"layer {row['layer']!r} has size {row['size']!r}; sizes must be positive.")
    keys = ["layer", "target", "metric", "bit"]
    duplicated = table.loc[table.duplicated(keys)]
    if len(duplicated):
        row = duplicated.iloc[0]
        raise SensitivityTableError(
            f"layer {row['layer']!r} has two rows for {row['target']} {row['metric']} at {row['bit']} bits."
        )
    sizes = table.groupby(["layer", "target"])["size"].nunique()
    if (sizes > 1).any():
        layer, target = sizes.index[np.flatnonzero(sizes.to_numpy() > 1)[0]]
        raise SensitivityTableError(f"layer {layer!r} has several {target} sizes; a layer has one size per target.")
    return table


def read_table(path: str | Path) -> pd.DataFrame:
    """Load and validate a table written by :func:`write_table` (CSV)."""
    path = Path(path)
    if not path.is_file():
        raise SensitivityTableError(f"sensitivity table not found: {path}")
    return validate_table(pd.read_csv(path))


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a validated table as CSV (diff-able, no extra dependency)."""
    path = Path(path)
    validate_table(table).to_csv(path, index=False)
    return path


def check_table_matches(table: pd.DataFrame, layers: Sequence[LayerInfo]) -> None:
    """Raise :class:`SensitivityTableError` unless ``table`` describes exactly these layers with weight sizes equal
    to their element counts: a model of the same family but other widths has the same layer names, so names alone
    do not say a table was measured on this model."""
    numel = {info.name: info.weight_numel for info in layers}
    sizes = table.loc[table["target"] == "weight"].drop_duplicates("layer").set_index("layer")["size"]
    missing = sorted(set(numel) - set(table["layer"]))
    extra = sorted(set(table["layer"]) - set(numel))
    if missing or extra:
        raise SensitivityTableError(
            f"the sensitivity table and the model disagree on layers: missing {missing[:3]}, unknown {extra[:3]}."
        )
    for name, size in sizes.items():
        if size != numel[name]:
            raise SensitivityTableError(
                f"layer {name!r}: table weight size {size:g} but the model has {numel[name]} weights."
            )


@dataclass(frozen=True)
class GroupMatrix:
    """One group's allocation data: ``values[i, j]`` is layer ``layers[i]``'s sensitivity at ``bits[j]``."""

    group: str
    target: str
    metric: str
    layers: tuple[str, ...]
    sizes: np.ndarray  # (n,) float64, weight or input-activation elements
    bits: tuple[int, ...]
    values: np.ndarray  # (n, len(bits)) float64


def group_matrix(
    table: pd.DataFrame,
    target: str,
    group: str,
    bits: tuple[int, ...],
    exclude: frozenset[str] = frozenset(),
    metric: str | None = None,
) -> GroupMatrix:
    """Pivot ``table`` into ``group``'s matrix for ``target`` at ``bits``, scored by ``metric`` (default: the
    group's own, :data:`GROUP_METRIC`; another one reproduces the single-metric ablation).

    Layers in ``exclude`` (protected ones) are left out. Every remaining layer of the group must have
    a value at every bit; the error names the first one that does not.
    """
    if target not in TARGETS:
        raise SensitivityTableError(f"target {target!r} is not one of {list(TARGETS)}.")
    if group not in GROUPS:
        raise SensitivityTableError(f"group {group!r} is not one of {list(GROUPS)}.")
    metric = GROUP_METRIC[group] if metric is None else metric
    if metric not in METRICS:
        raise SensitivityTableError(f"metric {metric!r} is not one of {list(METRICS)}.")
    members = table.loc[(table["target"] == target) & (table["group"] == group) & ~table["layer"].isin(exclude)]
    layers = tuple(dict.fromkeys(members["layer"]))
    rows = members.loc[(members["metric"] == metric) & members["bit"].isin(bits)]
    wide = rows.pivot(index="layer", columns="bit", values="value").reindex(index=list(layers), columns=list(bits))
    if wide.isna().any(axis=None):
        layer = wide.index[np.flatnonzero(wide.isna().any(axis=1).to_numpy())[0]]
        have = sorted(members.loc[(members["layer"] == layer) & (members["metric"] == metric), "bit"])
        raise SensitivityTableError(
            f"{group} layer {layer!r} lacks {target} {metric} values at some of bits {list(bits)} (has {have})."
        )
    sizes = members.drop_duplicates("layer").set_index("layer")["size"].reindex(list(layers))
    return GroupMatrix(
        group=group,
        target=target,
        metric=metric,
        layers=layers,
        sizes=sizes.to_numpy(dtype=float),
        bits=tuple(bits),
        values=wide.to_numpy(dtype=float),
    )


def group_sizes(table: pd.DataFrame, target: str, exclude: frozenset[str] = frozenset()) -> dict[str, float]:
    """Total size per group for ``target`` (weight or input-activation elements)."""
    rows = table.loc[(table["target"] == target) & ~table["layer"].isin(exclude)].drop_duplicates("layer")
    totals = rows.groupby("group")["size"].sum()
    return {g: float(totals.get(g, 0.0)) for g in GROUPS}


def size_ratio(table: pd.DataFrame, target: str, exclude: frozenset[str] = frozenset()) -> float:
    """MixDQ's r: total size of content layers over quality layers (r_w for weights, r_a for acts)."""
    sizes = group_sizes(table, target, exclude)
    if sizes["quality"] <= 0:
        raise SensitivityTableError(f"the table has no quality-group {target} layers, so the size ratio is undefined.")
    return sizes["content"] / sizes["quality"]


def select_protected(
    table: pd.DataFrame,
    share: float = PROTECTED_SHARE,
    act_bit: int | None = None,
    metrics: Mapping[str, str] = GROUP_METRIC,
) -> list[str]:
    """The ~``share`` most activation-sensitive layers, which MixDQ keeps entirely in FP16.

    Criterion (MixDQ's, reproduced on its published SDXL-Turbo data): per group, the
    ``ceil(share × layers in the group)`` layers with the lowest activation sensitivity at the highest
    activation bit-width present (8), scored by the group's own metric (SQNR for quality, SSIM for
    content; ``metrics`` overrides it per group for the single-metric ablation). At 1% that is
    4 quality + 5 content = 9 of SDXL's 794 layers. Ties go by layer name.
    """
    if not 0 <= share < 1:
        raise ValueError(f"protected share {share!r} must be in [0, 1), e.g. 0.01 for 1%.")
    act = table.loc[table["target"] == "act"]
    if act.empty:
        raise SensitivityTableError("the table has no activation rows, so protected layers cannot be chosen.")
    bit = int(act["bit"].max()) if act_bit is None else act_bit
    protected: list[str] = []
    for group in GROUPS:
        members = act.loc[act["group"] == group, "layer"].unique()
        count = math.ceil(share * len(members) - 1e-9)  # 0.05 · 420 is 21.000000000000004 in floats
        scored = act.loc[(act["group"] == group) & (act["metric"] == metrics[group]) & (act["bit"] == bit)]
        if count and scored["layer"].nunique() < len(members):
            raise SensitivityTableError(
                f"{group} layers lack act {metrics[group]} values at {bit} bits, needed to choose protected layers."
            )
        protected += scored.sort_values(["value", "layer"])["layer"].head(count).tolist()
    return protected
