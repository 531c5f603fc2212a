"""Plotly figures of the UNet: one heatmap column per unit (transformer block, resnet, ...) in forward
order, down → mid → up, one row per layer role. Pure functions of tables; no Gradio here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from mixdq.inventory import layer_block, split_layer_name

BIT_COLOURS = {2: "#d62728", 4: "#ff7f0e", 8: "#2ca02c", 16: "#1f77b4"}


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
    colorscale: str = "Viridis",
) -> go.Figure:
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
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(units))),
            y=roles,
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale=colorscale,
            colorbar=dict(title=colorbar_title),
            hoverongaps=False,
        )
    )
    fig.update_layout(
        title=title,
        xaxis=dict(tickmode="array", tickvals=ticks, ticktext=labels, title="UNet: down → mid → up"),
        yaxis=dict(autorange="reversed"),
        margin=dict(l=10, r=10, t=40, b=40),
        height=120 + 22 * len(roles),
    )
    for x in ticks[1:]:
        fig.add_vline(x=x - 0.5, line_width=1, line_color="white")
    return fig


def bits_heatmap(names: Sequence[str], bits: Mapping[str, int | None], title: str) -> go.Figure:
    """The allocation: each layer coloured by its bits (FP16 layers as 16)."""
    values = {n: float(bits.get(n) or 16) for n in names}
    scale = [[0.0, BIT_COLOURS[2]], [0.15, BIT_COLOURS[4]], [0.43, BIT_COLOURS[8]], [1.0, BIT_COLOURS[16]]]
    fig = unet_heatmap(
        names, values, title, "bits", {n: f"{int(v)} bits" for n, v in values.items()}, colorscale="Turbo"
    )
    fig.update_traces(colorscale=scale, zmin=2, zmax=16, colorbar=dict(title="bits", tickvals=[2, 4, 8, 16]))
    return fig


def ssim_to_db(ssim: float) -> float:
    """SSIM as -10·log10(1-SSIM): spreads values near 1 the way SQNR (dB) spreads small errors."""
    return 60.0 if ssim >= 1.0 else -10.0 * math.log10(1.0 - ssim)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
