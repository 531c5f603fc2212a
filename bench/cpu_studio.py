"""The studio's interactive paths on the CPU, timed as the page runs them (the README's CPU timing figures).

In-process through ``studio.services`` (the functions the page's callbacks call), plus two fresh processes:
``python app.py`` until it serves its page, and a cold import + first heatmap build. Nothing here draws in a
browser: the browser's own share (Gradio's round trip and Plotly drawing) is what tests/test_studio.py times.

    python bench/cpu_studio.py                # writes bench/results/cpu_studio.json and .md
    python bench/cpu_studio.py --repeats 5 --out /tmp/cpu_studio

Each figure is recorded as ``{"median": s, "p95": s, "samples": n}``; tests/test_readme_timings.py re-measures
them with the functions below and compares with the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from mixdq.allocate import AUTO, Allocator
from studio import services

RESULTS = ROOT / "bench" / "results" / "cpu_studio"
PROMPT = "a large red circle in the center, on a white background"
COMPARE_STEPS, COMPARE_PX = 4, 128  # the page's defaults for the embedded model

# name -> what it measures (the .md's rows; the README cites these names)
FIGURES = {
    "exact_ilp_published": "exact ILP (CBC), weights, both groups, auto K: SDXL-Turbo published data, 794 layers",
    "exact_ilp_embedded": "exact ILP (CBC), weights, both groups, auto K: the embedded model's table",
    "greedy_auto_k_published": "greedy preview with auto K, weights: published data, 794 layers",
    "greedy_auto_k_embedded": "greedy preview with auto K, weights: the embedded model's table",
    "slider_preview": "slider drag, a position not solved yet: services.allocate(exact=False) (greedy + 3 figures)",
    "slider_solved": "slider release at a position the background solver has solved: lookup + 3 figures",
    "slider_release": "slider release at a position not solved yet: services.allocate(exact=True) (CBC + figures)",
    "first_heatmap": "fresh process: imports, the embedded model's sources, both first heatmaps built",
    "app_serving": "`python app.py --device cpu` start until it serves its page (HTTP 200)",
    "compare_first": f"Compare, a new config (mixed ~W4A16): deploy + FP / fake-quant / deployed images + CLIP "
    f"score, {COMPARE_PX} px, {COMPARE_STEPS} steps",
    "compare_again": "Compare, the same config again (deployed UNet reused)",
}


def app_threads() -> int:
    """torch's CPU threads as app.py sets them (one core left for the web server); on a busy 2-core machine two
    OpenMP threads spinning against each other make an image tens of times slower."""
    return max(1, (os.cpu_count() or 1) - 1)


def summary(samples: list[float]) -> dict[str, Any]:
    """Median and 95th percentile (linear interpolation) of ``samples`` seconds."""
    return {
        "median": round(statistics.median(samples), 5),
        "p95": round(float(np.percentile(samples, 95)), 5),
        "samples": len(samples),
    }


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def embedded_source(cache_dir: Path) -> services.SensitivitySource:
    """The embedded model's sensitivity source, as app.py builds it (from config files, no weights)."""
    from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
    from studio.sources import build_sources, model_info_from_folder

    info = model_info_from_folder(EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID, "cpu", cache_dir)
    workspace, _ = build_sources(info, cache_dir)
    return workspace.source


def fresh_allocator(source: services.SensitivitySource) -> Allocator:
    """An allocator of ``source``'s data with an empty solution cache (each budget is solved, not looked up)."""
    return Allocator(source.table, source.protected, source.inventory, model_id=source.model_id)


def budgets_within(source: services.SensitivitySource, count: int) -> list[float]:
    """``count`` distinct slider positions (on the page's grid) inside the feasible weight range."""
    low, high = source.weight_range_bits()
    grid = np.arange(np.ceil(low / services.BITS_STEP) + 1, np.floor(high / services.BITS_STEP)) * services.BITS_STEP
    picks = np.linspace(0, len(grid) - 1, min(count, len(grid))).round().astype(int)
    return [round(float(grid[i]), 6) for i in dict.fromkeys(picks)]


def side_seconds(source: services.SensitivitySource, solver: str, count: int) -> list[float]:
    """Seconds per weight allocation at auto K by ``solver`` over ``count`` budgets (the group models built
    once before, as the studio's background solver has by the time a user asks)."""
    allocator = fresh_allocator(source)
    budgets = budgets_within(source, count + 1)
    allocator.allocate_side("weight", budgets[0], AUTO, solver)
    return [timed(lambda b=b: allocator.allocate_side("weight", b, AUTO, solver)) for b in budgets[1:]]


def slider_seconds(source: services.SensitivitySource, count: int) -> dict[str, list[float]]:
    """The budget view's callbacks at ``count`` positions: preview (not solved), release (solves), and the
    same positions again (solved: a lookup), with activations at 8 bits as the page starts."""
    source = services.SensitivitySource(
        source.label, source.model_id, source.table, source.inventory, fresh_allocator(source), source.front
    )
    budgets = budgets_within(source, count + 1)
    services.allocate(source, budgets[0], "bits", 8.0, AUTO, exact=True)  # activations solved, models built
    out: dict[str, list[float]] = {"slider_preview": [], "slider_release": [], "slider_solved": []}
    for b in budgets[1:]:
        out["slider_preview"].append(timed(lambda b=b: services.allocate(source, b, "bits", 8.0, AUTO, exact=False)))
        out["slider_release"].append(timed(lambda b=b: services.allocate(source, b, "bits", 8.0, AUTO, exact=True)))
        view = services.allocate(source, b, "bits", 8.0, AUTO, exact=False)
        assert view.exact, "a solved position must be answered by the ILP's result"
        out["slider_solved"].append(timed(lambda b=b: services.allocate(source, b, "bits", 8.0, AUTO, exact=False)))
    return out


FIRST_HEATMAP_SCRIPT = """
import time
start = time.perf_counter()
from pathlib import Path
from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from studio import services
from studio.sources import build_sources, model_info_from_folder
info = model_info_from_folder(EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID, "cpu", Path({cache!r}))
workspace, sources = build_sources(info, Path({cache!r}))
services.sensitivity_figures(next(iter(sources.values()))(), "weight", 4)
print(time.perf_counter() - start)
"""


def first_heatmap_seconds(cache_dir: Path) -> float:
    """A fresh interpreter's imports, the embedded model's sources and the first page's two heatmaps."""
    script = FIRST_HEATMAP_SCRIPT.format(cache=str(cache_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"first heatmap script failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def app_serving_seconds(cache_dir: Path, timeout: float = 120.0) -> float:
    """``python app.py`` from its start until its page answers (HTTP 200 with the studio's title)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "app.py", "--port", str(port), "--device", "cpu", "--cache-dir", str(cache_dir)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode} before serving")
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                if "MixDQ" in page:
                    return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"app.py did not serve within {timeout:.0f} s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def compare_seconds(cache_dir: Path) -> dict[str, float]:
    """One Compare of a new mixed config and the same again, as the page's button runs it (pipeline loaded
    before: the page loads it in the background). Weights mixed at the slider's start (~W4), activations
    FP16: an A8 Compare adds the one-off activation calibration (minutes on 2 busy cores, cached on disk)."""
    from mixdq.models import load_pipeline

    workspace = services.ModelWorkspace.from_pipeline(load_pipeline(device="cpu"), cache_dir)
    view = services.allocate(embedded_source(cache_dir), services.DEFAULT_BITS, "bits", None, AUTO, exact=True)
    config = services.with_run_options(view.result.config, workspace.inventory, "min-max (MixDQ)", False)
    run = lambda: workspace.compare(config, PROMPT, 0, COMPARE_STEPS, COMPARE_PX)
    return {"compare_first": timed(run), "compare_again": timed(run)}


def measure(repeats: int, cache_dir: Path, process_repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Every figure of :data:`FIGURES`: ``repeats`` samples of the in-process ones, ``process_repeats`` of the
    fresh-process ones and the Compare (seconds each)."""
    published, embedded = services.published_source(), embedded_source(cache_dir)
    samples: dict[str, list[float]] = {
        "exact_ilp_published": side_seconds(published, "cbc", repeats),
        "exact_ilp_embedded": side_seconds(embedded, "cbc", repeats),
        "greedy_auto_k_published": side_seconds(published, "approx", repeats),
        "greedy_auto_k_embedded": side_seconds(embedded, "approx", repeats),
        **slider_seconds(embedded, repeats),
    }
    samples["first_heatmap"] = [first_heatmap_seconds(cache_dir) for _ in range(process_repeats)]
    samples["app_serving"] = [app_serving_seconds(cache_dir) for _ in range(process_repeats)]
    compares = [compare_seconds(cache_dir) for _ in range(process_repeats)]
    for key in ("compare_first", "compare_again"):
        samples[key] = [c[key] for c in compares]
    return {key: summary(samples[key]) for key in FIGURES}


def markdown(meta: dict[str, Any], figures: dict[str, dict[str, Any]]) -> str:
    rows = "\n".join(
        f"| `{key}` | {FIGURES[key]} | {1000 * f['median']:,.1f} | {1000 * f['p95']:,.1f} | {f['samples']} |"
        for key, f in figures.items()
    )
    return (
        f"# Studio on the CPU: {meta['machine']}, {meta['date']}\n\n"
        f"`{meta['command']}` at commit {meta['commit']}; torch {meta['torch']} with {meta['torch_threads']} "
        f"thread(s) (as app.py: one core left for the web server), Python {meta['python']}.\n\n"
        f"{meta['note']} Load average (1 min) before / after: "
        f"{' / '.join(str(v) for v in meta['load_average_1min'])} on {os.cpu_count()} cores.\n\n"
        "| figure | what | median ms | p95 ms | samples |\n| --- | --- | --- | --- | --- |\n"
        f"{rows}\n"
    )


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="output path without suffix (.json / .md)")
    parser.add_argument("--repeats", type=int, default=15, help="samples of each in-process figure")
    parser.add_argument("--process-repeats", type=int, default=3, help="fresh processes / Compares")
    parser.add_argument(
        "--note",
        default="",
        help="what else ran on the machine (a shared machine makes every figure slower)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(app_threads())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mixdq-bench-cache-") as cache:
        figures = measure(args.repeats, Path(cache), args.process_repeats)
    meta = {
        "command": shlex.join(["python", "bench/cpu_studio.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "note": args.note,
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "figures": figures}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(meta, figures))
    print(markdown(meta, figures))
    return figures


if __name__ == "__main__":
    main()
