"""Recorded benchmark results for the tests that guard README's timing figures.

A figure is re-measured by the benchmark's own function and compared with its record: the fastest of the new
samples slower than ``SLOWDOWN`` x the recorded median + ``SLACK_S`` fails. The fastest sample, because on a
shared machine the others carry whatever else runs (a millisecond figure swings 3-5x under load 8 on 2 cores,
its best sample far less); a slower code path slows every sample. The README quotes the record, so a real
regression (or a stale record) shows up here instead of in a loosened assert.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SLOWDOWN = 3.0
SLACK_S = 0.005


def load_record(name: str) -> dict:
    """``bench/results/<name>.json``: ``{"meta": {...}, "figures": {figure: {"median", "p95", "samples"}}}``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def allowed_seconds(recorded_median: float) -> float:
    return SLOWDOWN * recorded_median + SLACK_S


def check_against_record(record: dict, figure: str, samples: list[float]) -> str:
    """Assert the fastest of ``samples`` is within the tolerance of the recorded median; a line for the log."""
    recorded = record["figures"][figure]["median"]
    measured = min(samples)
    line = (
        f"{figure}: {1000 * measured:.1f} ms now (fastest of {len(samples)}; median "
        f"{1000 * statistics.median(samples):.1f}), {1000 * recorded:.1f} ms recorded (median)"
    )
    assert measured <= allowed_seconds(recorded), f"{line}: slower than {SLOWDOWN}x + {1000 * SLACK_S:.0f} ms"
    return line
