"""The SDXL-Turbo sensitivities published by the MixDQ authors, as a tidy table.

They let the studio and the allocator run at real SDXL-Turbo scale (794 layers) with no model
weights. The data ships in ``assets/sdxl-turbo/`` (see its README for provenance and caveats).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import yaml

from mixdq.config import MIXDQ_YAML_PREFIX
from mixdq.inventory import UNetInventory, inventory_from_unet_config
from mixdq.sensitivity.table import COLUMNS, validate_table

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "sdxl-turbo"
SDXL_TURBO_MODEL_ID = "stabilityai/sdxl-turbo"
# The published files list each layer's values at these bits, in this order.
PUBLISHED_BITS: tuple[int, ...] = (2, 4, 8)
# The size files are normalized: weight elements / conv_in's 11520, activation elements / 320.
SIZE_UNITS: dict[str, int] = {"weight": 11520, "act": 320}
VALUE_FILES: dict[tuple[str, str], str] = {
    ("weight", "sqnr"): "weight_sqnr.yaml",
    ("weight", "ssim"): "weight_ssim.yaml",
    ("act", "sqnr"): "act_sqnr.yaml",
    ("act", "ssim"): "act_ssim.yaml",
}


@functools.cache
def sdxl_turbo_inventory() -> UNetInventory:
    """SDXL-Turbo's 794 layers (743 Linear + 51 Conv2d), for exact MB of its weights."""
    return inventory_from_unet_config(ASSET_DIR / "unet_config.json")


def load_published_table() -> pd.DataFrame:
    """The published weight and activation sensitivities of SDXL-Turbo as a validated tidy table.

    Quality layers come with SQNR only; content layers with SQNR and SSIM (the allocator scores
    content by SSIM, see :data:`mixdq.sensitivity.table.GROUP_METRIC`). Sizes are exact element counts.
    """
    return _published_table().copy()


@functools.cache
def _published_table() -> pd.DataFrame:
    layers = {info.name: info for info in sdxl_turbo_inventory().layers}
    rows = []
    for target, unit in SIZE_UNITS.items():
        sizes = {_strip(key): round(value * unit) for key, value in _read_yaml(f"{target}_size.yaml").items()}
        if sizes.keys() != layers.keys():
            unknown = sorted(sizes.keys() ^ layers.keys())
            raise ValueError(f"{target}_size.yaml and the SDXL UNet disagree on layers, e.g. {unknown[:3]}.")
        for (value_target, metric), filename in VALUE_FILES.items():
            if value_target != target:
                continue
            for key, values in _read_yaml(filename).items():
                name = _strip(key)
                info = layers[name]
                for bit, value in zip(PUBLISHED_BITS, values, strict=True):
                    rows.append((name, info.group, info.kind, info.block, sizes[name], bit, target, metric, value))
    return validate_table(pd.DataFrame(rows, columns=list(COLUMNS)))


def _read_yaml(filename: str) -> dict:
    with open(ASSET_DIR / filename) as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _strip(key: str) -> str:
    return key.removeprefix(MIXDQ_YAML_PREFIX)
