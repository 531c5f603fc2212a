"""Which sensitivity data the studio offers: the loaded model's (shipped or cached) and SDXL-Turbo's
published table. Built once at start-up."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mixdq.inventory import LayerInfo, inventory_fingerprint, layer_inventory
from mixdq.models import EMBEDDED_MODEL_DIR
from mixdq.sensitivity.table import SensitivityTableError, read_table
from studio.services import BITS_STEP, PUBLISHED_LABEL, ModelWorkspace, SensitivitySource, published_source

SHIPPED_TABLE = EMBEDDED_MODEL_DIR / "sensitivity.csv"


def model_table_path(fingerprint: str, cache_dir: Path) -> Path:
    """Where a sweep of a model with this layer fingerprint is cached for the studio."""
    return cache_dir / f"studio-sensitivity-{fingerprint}.csv"


def find_model_table(layers: list[LayerInfo], cache_dir: Path) -> pd.DataFrame | None:
    """The loaded model's sensitivity table: shipped with the embedded model, or cached by a sweep.
    A table counts only if it lists exactly this model's layers with this model's weight sizes (a model
    of the same architecture family but other widths has the same layer names)."""
    numel = {info.name: info.weight_numel for info in layers}
    for path in (SHIPPED_TABLE, model_table_path(inventory_fingerprint(layers), cache_dir)):
        if not path.is_file():
            continue
        try:
            table = read_table(path)
        except SensitivityTableError:
            continue
        weights = table[table.target == "weight"].drop_duplicates("layer")
        sizes = zip(weights.layer, weights["size"], strict=True)
        if set(table.layer) == set(numel) and all(numel[n] == size for n, size in sizes):
            return table
    return None


def build_sources(pipe, cache_dir: Path) -> tuple[ModelWorkspace, dict[str, Callable[[], SensitivitySource]]]:
    """The workspace of the loaded model and the sensitivity sources (label -> cached factory),
    loaded model first. The published SDXL-Turbo source is built in the background when it is not
    the first one shown, so start-up does not wait for it."""
    layers = layer_inventory(pipe.unet)
    table = find_model_table(layers, cache_dir)
    workspace = ModelWorkspace(pipe, cache_dir, table)
    sources: dict[str, Callable[[], SensitivitySource]] = {}
    if workspace.source is not None:
        model_source = workspace.source
        sources[model_source.label] = lambda: model_source
    sources[PUBLISHED_LABEL] = published_source
    threading.Thread(target=_prewarm, args=(list(sources.values()),), name="prewarm", daemon=True).start()
    return workspace, sources


def _prewarm(factories: list[Callable[[], SensitivitySource]]) -> None:
    """Build every source and solve its slider positions, at low CPU priority so users come first."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)  # this thread and the CBC it starts
    for factory in factories:
        factory().prewarm(BITS_STEP)
