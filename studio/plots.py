"""The studio's charts as plain plotly.js specs (dicts) and HTML: one heatmap column per UNet unit
(transformer block, resnet, ...) in forward order, down → mid → up, one row per layer role.

Plain dicts rather than ``plotly.graph_objects``: the figure classes validate every property, which
took ~90 ms per allocation heatmap, most of a slider release. Pure functions of tables; no Gradio here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mixdq.inventory import layer_block, split_layer_name

BIT_COLOURS = {2: "#d62728", 4: "#ff7f0e", 8: "#2ca02c", 16: "#1f77b4"}
BITS_SCALE = [[0.0, BIT_COLOURS[2]], [0.15, BIT_COLOURS[4]], [0.43, BIT_COLOURS[8]], [1.0, BIT_COLOURS[16]]]
# The look of plotly's default template, without sending the whole template with every chart.
# Margins are set, not "automargin": measuring labels costs plotly.js an extra layout pass per draw.
_AXIS = {"gridcolor": "white", "zerolinecolor": "white", "linecolor": "white"}
_LOOK = {
    "plot_bgcolor": "#E5ECF6",
    "paper_bgcolor": "white",
    "font": {"color": "#2a3f5f"},
    "hoverlabel": {"align": "left"},
}

Spec = dict[str, Any]


def to_json(spec: Spec) -> str:
    """The spec as plotly.js JSON (non-finite numbers become null, as plotly does)."""
    return json.dumps(_finite(spec), separators=(",", ":"))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _layout(title: str, height: int, **extra: Any) -> Spec:
    layout = {**_LOOK, "title": {"text": title}, "height": height, **extra}
    for axis in ("xaxis", "yaxis"):
        layout[axis] = {**_AXIS, **layout.get(axis, {})}
    return layout


def _grid(names: Sequence[str], values: Mapping[str, float]):
    """Rows (roles), columns (units) and the matrix of values for ``names`` in module order."""
    units: list[str] = []
    roles: list[str] = []
    for name in names:
        unit, role = split_layer_name(name)
        if unit not in units:
            units.append(unit)
        if role not in roles:
            roles.append(role)
    col = {u: i for i, u in enumerate(units)}
    row = {r: i for i, r in enumerate(roles)}
    z = [[None] * len(units) for _ in roles]
    layer_at = [[""] * len(units) for _ in roles]
    for name in names:
        unit, role = split_layer_name(name)
        r, c = row[role], col[unit]
        z[r][c] = values.get(name)
        layer_at[r][c] = name
    return roles, units, z, layer_at


def _block_ticks(units: Sequence[str]) -> tuple[list[int], list[str]]:
    """One x tick at the first column of each UNet block, labelled with the block."""
    positions, labels, last = [], [], None
    for i, unit in enumerate(units):
        block = layer_block(unit)
        if not block.startswith(("down", "mid", "up")):
            block = "out" if block == "conv_out" else "in"
        if block != last:
            positions.append(i)
            labels.append(block)
            last = block
    return positions, labels


def unet_heatmap(
    names: Sequence[str],
    values: Mapping[str, float],
    title: str,
    colorbar_title: str,
    hover_values: Mapping[str, str] | None = None,
    sizes: Mapping[str, float] | None = None,
    colorscale: str | list = "Viridis",
    zrange: tuple[float, float] | None = None,
    colorbar_ticks: Sequence[float] | None = None,
) -> Spec:
    """A heatmap of ``values`` (per layer name) laid out as the UNet; ``names`` in module order."""
    roles, units, z, layer_at = _grid(names, values)
    hover = [
        [
            ""
            if not layer
            else f"{layer}<br>value: {(hover_values or {}).get(layer, _fmt(values.get(layer)))}"
            + (f"<br>size: {sizes[layer]:,.0f}" if sizes and layer in sizes else "")
            for layer in row
        ]
        for row in layer_at
    ]
    ticks, labels = _block_ticks(units)
    colorbar: Spec = {"title": {"text": colorbar_title}}
    if colorbar_ticks is not None:
        colorbar["tickvals"] = list(colorbar_ticks)
    trace: Spec = {
        "type": "heatmap",
        "z": z,
        "x": list(range(len(units))),
        "y": roles,
        "text": hover,
        "hovertemplate": "%{text}<extra></extra>",
        "colorscale": colorscale,
        "colorbar": colorbar,
        "hoverongaps": False,
    }
    if zrange is not None:
        trace["zmin"], trace["zmax"] = zrange
    block_lines = [
        {
            "type": "line",
            "xref": "x",
            "yref": "y domain",
            "x0": x - 0.5,
            "x1": x - 0.5,
            "y0": 0,
            "y1": 1,
            "line": {"width": 1, "color": "white"},
        }
        for x in ticks[1:]
    ]
    layout = _layout(
        title,
        120 + 22 * len(roles),
        xaxis={
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": labels,
            "title": {"text": "UNet: down → mid → up"},
        },
        yaxis={"autorange": "reversed"},
        margin={"l": 20 + 7 * max(map(len, roles), default=0), "r": 10, "t": 40, "b": 50},
        shapes=block_lines,
    )
    return {"data": [trace], "layout": layout}


def bits_heatmap(names: Sequence[str], bits: Mapping[str, int | None], title: str) -> Spec:
    """The allocation: each layer coloured by its bits (FP16 layers as 16)."""
    values = {n: float(bits.get(n) or 16) for n in names}
    hover = {n: f"{int(v)} bits" for n, v in values.items()}
    return unet_heatmap(
        names, values, title, "bits", hover, colorscale=BITS_SCALE, zrange=(2, 16), colorbar_ticks=(2, 4, 8, 16)
    )


def pareto_chart(mb: Sequence[float], score: Sequence[float], current: tuple[float, float] | None = None) -> Spec:
    """Score against UNet MB along the front, with the current allocation marked."""
    data: list[Spec] = [
        {
            "type": "scatter",
            "x": list(mb),
            "y": list(score),
            "mode": "lines+markers",
            "name": "MixDQ front",
            "hovertemplate": "%{x:.1f} MB<br>score %{y:.3f}<extra></extra>",
        }
    ]
    if current is not None:
        data.append(
            {
                "type": "scatter",
                "x": [current[0]],
                "y": [current[1]],
                "mode": "markers",
                "marker": {"size": 14, "color": "red"},
                "name": "current",
                "hovertemplate": "%{x:.1f} MB<br>score %{y:.3f}<extra>current</extra>",
            }
        )
    layout = _layout(
        "Precision / quality frontier (weights)",
        300,
        xaxis={"title": {"text": "UNet weights (MB)"}},
        yaxis={"title": {"text": "score (1 = all 8-bit)"}},
        margin={"l": 60, "r": 10, "t": 40, "b": 50},
    )
    return {"data": data, "layout": layout}


def memory_bar(fp16_mb: float, quant_mb: float) -> str:
    """FP16 vs quantized UNet weight memory as two HTML bars: drawn instantly, no chart library."""
    rows = []
    for label, mb, colour in (("FP16", fp16_mb, BIT_COLOURS[16]), ("quantized", quant_mb, BIT_COLOURS[8])):
        width = 100.0 * mb / max(fp16_mb, quant_mb, 1e-9)
        rows.append(
            f'<div style="display:flex;align-items:center;gap:8px;margin:4px 0">'
            f'<span style="width:72px;text-align:right">{label}</span>'
            f'<span style="flex:1;background:#E5ECF6">'
            f'<span style="display:block;width:{width:.1f}%;background:{colour};color:white;'
            f'white-space:nowrap;padding:2px 6px;box-sizing:border-box">{mb:,.1f} MB</span></span></div>'
        )
    ratio = fp16_mb / quant_mb if quant_mb else math.inf
    return (
        '<div id="memory-bar"><b>UNet weight memory</b>'
        + "".join(rows)
        + f'<div style="text-align:right;font-size:90%">{ratio:.2f}x smaller</div></div>'
    )


def ssim_to_db(ssim: float) -> float:
    """SSIM as -10·log10(1-SSIM): spreads values near 1 the way SQNR (dB) spreads small errors."""
    return 60.0 if ssim >= 1.0 else -10.0 * math.log10(1.0 - ssim)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
