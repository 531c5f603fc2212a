"""Calibrated activation ranges: the data calibration produces and quantization consumes, with its on-disk form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_NAME = "mixdq-studio/activation-ranges"
SCHEMA_VERSION = 1
RANGES_FILE = "ranges.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(eq=False)
class ActivationRanges:
    """Calibrated input ranges: ``ranges[bits][layer]`` is a float32 ``(parts, 2)`` tensor of ``(min, max)``
    rows (2 parts for a concat-split ``conv_shortcut``, else 1), plus how they were made."""

    ranges: dict[int, dict[str, torch.Tensor]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``ranges.safetensors`` and ``manifest.json`` into ``directory`` and return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{bits}/{name}": r.contiguous() for bits, by_layer in self.ranges.items() for name, r in by_layer.items()
        }
        save_file(tensors, str(directory / RANGES_FILE))
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest(self.provenance), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ActivationRanges:
        """Read what :meth:`save` wrote."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            raise ValueError(
                f"{directory} holds no activation ranges ({MANIFEST_FILE} missing or not {FORMAT_NAME!r} v{SCHEMA_VERSION})."
            )
        ranges: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(directory / RANGES_FILE)).items():
            bits, name = key.split("/", 1)
            ranges.setdefault(int(bits), {})[name] = tensor
        return cls(ranges=ranges, provenance=manifest["provenance"])


def manifest(provenance: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "provenance": provenance}


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in ``directory`` if it is one of ours, else ``None``."""
    path = directory / MANIFEST_FILE
    if not path.is_file() or not (directory / RANGES_FILE).is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT_NAME
        or manifest.get("schema_version") != SCHEMA_VERSION
    ):
        return None
    return manifest
