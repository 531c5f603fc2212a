"""Which model and sensitivity data the studio offers: the model's own table (shipped or cached) and
SDXL-Turbo's published one. Built once at start-up, from config files: the pipeline itself loads later."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mixdq.inventory import LayerInfo, UNetInventory, inventory_fingerprint, inventory_from_unet_config
from mixdq.models import EMBEDDED_MODEL_DIR
from mixdq.sensitivity.table import SensitivityTableError, check_table_matches, read_table
from studio.services import (
    BITS_STEP,
    PUBLISHED_LABEL,
    ModelInfo,
    ModelWorkspace,
    SensitivitySource,
    published_source,
)

SHIPPED_TABLE = EMBEDDED_MODEL_DIR / "sensitivity.csv"
INVENTORY_CACHE_VERSION = 2  # bump when LayerInfo's fields or the saved format change


def model_table_path(fingerprint: str, cache_dir: Path) -> Path:
    """Where a sweep of a model with this layer fingerprint is cached for the studio."""
    return cache_dir / f"studio-sensitivity-{fingerprint}.csv"


def find_model_table(layers: list[LayerInfo], cache_dir: Path) -> pd.DataFrame | None:
    """The loaded model's sensitivity table: shipped with the embedded model, or cached by a sweep.
    A table counts only if it lists exactly this model's layers with this model's weight sizes (a model
    of the same architecture family but other widths has the same layer names)."""
    for path in (SHIPPED_TABLE, model_table_path(inventory_fingerprint(layers), cache_dir)):
        if not path.is_file():
            continue
        try:
            table = read_table(path)
            check_table_matches(table, layers)
        except SensitivityTableError:
            continue
        return table
    return None


def model_folder(name_or_path: str | None) -> Path | None:
    """The local folder of a diffusers pipeline (``None``: the embedded model), found without loading
    it; ``None`` when its configs are not on this machine (then the studio loads the pipeline first)."""
    if name_or_path is None:
        folder = EMBEDDED_MODEL_DIR
    elif Path(name_or_path).is_dir():
        folder = Path(name_or_path)
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), local_files_only=True, allow_patterns=["*.json"]))
        except (OSError, ValueError):  # not cached, or not a hub id: load_pipeline says why
            return None
    has_configs = all((folder / part / "config.json").is_file() for part in ("unet", "vae"))
    return folder if (folder / "model_index.json").is_file() and has_configs else None


def model_info_from_folder(folder: Path, model_id: str, device: str, cache_dir: Path | None = None) -> ModelInfo:
    """The model's layer inventory and default image size, from its config files (no weights)."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelInfo(model_id, unet_inventory(folder / "unet" / "config.json", cache_dir), device, size)


SHIPPED_INVENTORY = "mixdq_inventory.json"  # beside a UNet config.json: its layer list, shipped with the model


def unet_inventory(config_path: Path, cache_dir: Path | None = None) -> UNetInventory:
    """The inventory of the UNet a diffusers config describes (built on ``meta``). Building it imports
    diffusers and transformers (~3 s, most of a start-up), so it is read instead, when possible, from
    ``mixdq_inventory.json`` beside the config (written by :func:`write_shipped_inventory` for the embedded
    model, valid while the config's bytes match) or from ``cache_dir`` (keyed by the config's bytes and the
    diffusers version): then the page is served without importing diffusers."""
    text = config_path.read_bytes()
    shipped = _read_inventory(config_path.parent / SHIPPED_INVENTORY, _config_key(text, with_diffusers=False))
    if shipped is not None:
        return shipped
    cached = None
    if cache_dir is not None:
        key = _config_key(text, with_diffusers=True)
        cached = cache_dir / f"studio-inventory-v{INVENTORY_CACHE_VERSION}-{key}.json"
        found = _read_inventory(cached, key)
        if found is not None:
            return found
    inventory = inventory_from_unet_config(config_path)
    if cached is not None:
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(_inventory_json(inventory, key))
            partial.replace(cached)
    return inventory


def write_shipped_inventory(config_path: Path) -> Path:
    """Write ``mixdq_inventory.json`` beside a UNet config (for a model shipped with the studio; the test
    ``test_shipped_inventory_matches_the_model`` checks it against a fresh build)."""
    target = config_path.parent / SHIPPED_INVENTORY
    key = _config_key(config_path.read_bytes(), with_diffusers=False)
    target.write_text(_inventory_json(inventory_from_unet_config(config_path), key))
    return target


def _config_key(text: bytes, with_diffusers: bool) -> str:
    """Cache key of a config's bytes (and, for the cache dir, the diffusers version that builds the UNet)."""
    if with_diffusers:
        text += importlib.metadata.version("diffusers").encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _inventory_json(inventory: UNetInventory, key: str) -> str:
    layers = [dataclasses.asdict(info) for info in inventory.layers]
    saved = {"version": INVENTORY_CACHE_VERSION, "config_key": key, "other_params": inventory.other_params}
    return json.dumps({**saved, "layers": layers})


def _read_inventory(path: Path, key: str) -> UNetInventory | None:
    """The inventory saved at ``path`` for a config with ``key``; ``None`` if absent, stale or unreadable."""
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text())
        if saved["version"] == INVENTORY_CACHE_VERSION and saved["config_key"] == key:
            layers = tuple(LayerInfo(**{**d, "weight_shape": tuple(d["weight_shape"])}) for d in saved["layers"])
            return UNetInventory(layers, saved["other_params"])
    return None


def build_sources(
    info_or_pipe: ModelInfo | object, cache_dir: Path
) -> tuple[ModelWorkspace, dict[str, Callable[[], SensitivitySource]]]:
    """The workspace of the model (a :class:`ModelInfo` before its pipeline loads, or a loaded pipeline)
    and the sensitivity sources (label -> cached factory), the model's own first when it has a table."""
    info = info_or_pipe if isinstance(info_or_pipe, ModelInfo) else ModelInfo.of_pipeline(info_or_pipe)
    pipe = None if isinstance(info_or_pipe, ModelInfo) else info_or_pipe
    table = find_model_table(list(info.inventory.layers), cache_dir)
    workspace = ModelWorkspace(info, cache_dir, table, pipe)
    sources: dict[str, Callable[[], SensitivitySource]] = {}
    if workspace.source is not None:
        model_source = workspace.source
        sources[model_source.label] = lambda: model_source
    sources[PUBLISHED_LABEL] = published_source
    return workspace, sources


def prewarm_in_background(
    sources: dict[str, Callable[[], SensitivitySource]], after: threading.Event | None = None
) -> threading.Thread:
    """Build every source and solve its slider positions in a daemon thread at low CPU priority, once
    ``after`` is set (or 10 s passed): the first page is drawn before this competes with it."""
    thread = threading.Thread(target=_prewarm, args=(list(sources.values()), after), name="prewarm", daemon=True)
    thread.start()
    return thread


def _prewarm(factories: list[Callable[[], SensitivitySource]], after: threading.Event | None) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)  # this thread and the CBC it starts
    if after is not None:
        after.wait(timeout=10)
    for factory in factories:
        factory().prewarm(BITS_STEP)
