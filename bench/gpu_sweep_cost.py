"""What one sensitivity evaluation (one layer at one bit) costs on the full-size SDXL architecture, on one GPU
and across GPUs.

The MixDQ authors' sweep logs show about 6.6 s per layer x bit for SQNR alone (:data:`AUTHORS_SECONDS`), which
makes a sweep of SDXL's 794 layers at 5 candidate bits hours long on one GPU. This script measures our
evaluation on the same architecture (random weights: the cost does not depend on their values), on a sample of
layers from both groups (SQNR for quality layers, SSIM of decoded images for content layers) at every candidate
bit, and extrapolates the whole sweep from the per-metric means and the inventory's group sizes.

One GPU (``WORLD_SIZE`` unset or 1): one row per evaluation, ``PREFIX.json`` and ``PREFIX.md`` rewritten after
each one, so a killed call keeps what it measured. The first evaluation of each metric is a warm-up (cuDNN
plans, allocator) and is reported but left out of the means.

Many GPUs, the scaling run (``torchrun --nproc-per-node N``): the same job list through
:func:`mixdq.sensitivity.distributed.run_sweep_distributed` (shared work queue); rank 0 writes the wall time,
the evaluations per rank and the per-metric means when the job ends. Speed-up and efficiency against the
one-GPU run of the same job list (``--scaling``)::

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null
    export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
    python3 bench/gpu_sweep_cost.py --out $OUT/cost_1gpu                 # per-evaluation cost, anchor compared
    for n in 1 2 4 8; do torchrun --nproc-per-node $n bench/gpu_sweep_cost.py --layers-per-group 8 \\
        --out $OUT/scale_$n; done
    python3 bench/gpu_sweep_cost.py --scaling $OUT/scale_*.json --out $OUT/scaling

CPU smoke runs on the embedded model (tests/test_distributed.py runs the first one in-process)::

    python bench/gpu_sweep_cost.py --tiny --out /tmp/cost            # ~20 s
    torchrun --nproc-per-node 2 bench/gpu_sweep_cost.py --tiny --out /tmp/cost_2

Settings: SDXL-Turbo's sampling (1 step, guidance 0), ``--px`` 512, ``--prompts`` 16 captions from
``assets/prompts.txt`` (the CLI's default), FP16 weights on CUDA and IEEE FP32 arithmetic settings as the
sweep always uses (:func:`mixdq.numerics.fp32_numerics`). Activation ranges come from a one-prompt, one-step
calibration (their values do not change the cost either). MB = 1e6 bytes; times are ``time.perf_counter``
around a synchronizing evaluation (each ends in ``.item()``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixdq.calibrate import calibrate, default_prompts
from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.distributed import process_group
from mixdq.inventory import LayerInfo, layer_inventory
from mixdq.numerics import fp32_numerics, numerics_settings
from mixdq.sensitivity.distributed import run_sweep_distributed
from mixdq.sensitivity.sweep import SweepRun, SweepSettings, sweep_jobs
from mixdq.sensitivity.table import GROUP_METRIC, GROUPS

# MixDQ authors' logged SQNR sensitivity cost per layer x bit on SDXL-Turbo (one GPU).
AUTHORS_SECONDS = 6.6


def sample_layers(layers: list[LayerInfo], per_group: int) -> tuple[str, ...]:
    """``per_group`` layers of each group, evenly spaced through the inventory (blocks of every depth)."""
    chosen = []
    for group in GROUPS:
        members = [info.name for info in layers if info.group == group]
        count = min(per_group, len(members))
        chosen += [members[round(i * (len(members) - 1) / max(1, count - 1))] for i in range(count)]
    order = {info.name: i for i, info in enumerate(layers)}
    return tuple(sorted(set(chosen), key=order.__getitem__))


def build_pipe(args: argparse.Namespace):
    if args.tiny:
        from mixdq.models import load_pipeline

        return load_pipeline(None, device=args.device, dtype=torch.float32)
    from mixdq.models import build_sdxl_random_pipeline

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = build_sdxl_random_pipeline(device=args.device, dtype=dtype)
    # SDXL's VAE overflows in FP16; diffusers' pipeline decodes in FP32 (force_upcast), so the sweep does too.
    pipe.vae.to(torch.float32)
    return pipe


def machine(device: str) -> dict[str, Any]:
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if device == "cuda":
        info["gpus_visible"] = torch.cuda.device_count()
    return info


def full_sweep_estimate(layers: list[LayerInfo], means: dict[str, float]) -> dict[str, Any]:
    """Seconds for every layer at every candidate bit on one GPU, from the per-metric means."""
    bits = len(WEIGHT_BITS) + len(ACT_BITS)
    counts = {group: sum(info.group == group for info in layers) for group in GROUPS}
    if not all(GROUP_METRIC[g] in means for g in GROUPS if counts[g]):
        return {}
    seconds = sum(counts[g] * bits * means[GROUP_METRIC[g]] for g in GROUPS)
    return {"layers": counts, "bits_per_layer": bits, "evaluations": sum(counts.values()) * bits, "seconds": seconds}


def write(prefix: Path, report: dict[str, Any]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Sensitivity sweep cost, {report['model']} ({m['device']}, torch {m['torch']}, {m['date']})", ""]
    lines.append(f"Settings: {json.dumps(report['settings'])}")
    if "rows" in report:
        lines += ["", "| layer | group | target | bit | metric | seconds | warm-up |", "|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            warm = "yes" if r["warmup"] else ""
            lines.append(
                f"| {r['layer']} | {r['group']} | {r['target']} | {r['bit']} | {r['metric']} | {r['seconds']:.3f} | {warm} |"
            )
    if report.get("mean_seconds"):
        lines += ["", "| metric | mean s per layer x bit | vs authors' 6.6 s (SQNR) |", "|---|---|---|"]
        for metric, mean in report["mean_seconds"].items():
            versus = f"{AUTHORS_SECONDS / mean:.1f}x faster" if metric == "sqnr" else "(anchor is SQNR only)"
            lines.append(f"| {metric} | {mean:.3f} | {versus} |")
    if report.get("unet_forward_seconds"):
        lines.append(f"\nOne batched FP UNet forward over the prompts: {report['unet_forward_seconds']:.3f} s.")
    estimate = report.get("full_sweep_estimate")
    if estimate:
        lines.append(
            f"Whole sweep ({estimate['evaluations']} evaluations) on this one device, estimated: "
            f"{estimate['seconds'] / 3600:.2f} h (authors' rate for every one: "
            f"{estimate['evaluations'] * AUTHORS_SECONDS / 3600:.2f} h)."
        )
    if "world_size" in report:
        lines.append(
            f"\n{report['world_size']} ranks: {report['evaluations']} evaluations in {report['wall_seconds']:.1f} s "
            f"wall (sweep part {report['sweep_seconds']:.1f} s); per rank {report['evaluations_per_rank']}."
        )
    return "\n".join(lines) + "\n"


@fp32_numerics()
def one_gpu(args: argparse.Namespace, pipe, ranges, settings: SweepSettings, report: dict[str, Any]) -> None:
    layers = layer_inventory(pipe.unet)
    report["settings"]["numerics"] = numerics_settings()
    started = time.perf_counter()
    run = SweepRun(pipe, ranges, settings, layers)
    report["unet_forward_seconds"] = run.reference.unet_forward_seconds
    rows: list[dict[str, Any]] = report.setdefault("rows", [])
    sweep_started = time.perf_counter()
    for layer, target, bit in sweep_jobs(layers, settings):
        row, metric, seconds = run.evaluate((layer, target, bit))
        warmup = not any(r["metric"] == metric for r in rows)
        rows.append(
            {"layer": layer, "group": row[1], "target": target, "bit": bit, "metric": metric}
            | {"value": row[-1], "seconds": seconds, "warmup": warmup}
        )
        timed: dict[str, list[float]] = {}
        for r in rows:
            if not r["warmup"]:
                timed.setdefault(r["metric"], []).append(r["seconds"])
        report["mean_seconds"] = {m: sum(v) / len(v) for m, v in timed.items()}
        report["full_sweep_estimate"] = full_sweep_estimate(layers, report["mean_seconds"])
        report["wall_seconds"] = time.perf_counter() - started
        report["sweep_seconds"] = time.perf_counter() - sweep_started
        write(args.out, report)


@fp32_numerics()
def many_gpus(args: argparse.Namespace, pipe, ranges, settings: SweepSettings, report: dict[str, Any], ctx) -> None:
    import torch.distributed as dist

    cache = args.cache_dir or (tempfile.mkdtemp(prefix="mixdq-sweep-cost-") if ctx.is_main else None)
    cache = Path(ctx.broadcast(str(cache)))  # rank 0's folder, for every rank's part files
    started = time.perf_counter()
    evaluated: list = []
    report["settings"]["numerics"] = numerics_settings()
    ctx.barrier()
    _, stats = run_sweep_distributed(pipe, ranges, settings, cache, progress=False, evaluations=evaluated)
    wall = time.perf_counter() - started
    counts = [None] * ctx.world_size
    dist.all_gather_object(counts, len(evaluated))
    report |= {
        "world_size": ctx.world_size,
        "evaluations": stats.evaluations,
        "wall_seconds": wall,
        "sweep_seconds": stats.seconds,
        "evaluations_per_rank": counts,
        "mean_seconds": stats.seconds_per_eval,
        "unet_forward_seconds": stats.unet_forward_seconds,
    }
    if ctx.is_main:
        write(args.out, report)


def scaling(paths: list[Path], out: Path) -> None:
    """Speed-up and efficiency of the scaling runs against the one-rank run of the same job list."""
    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r.get("world_size", 1))
    base = runs[0]
    if base.get("world_size", 1) != 1:
        raise SystemExit("error: --scaling needs the one-GPU run (torchrun --nproc-per-node 1) among the files.")
    lines = [f"# Sweep scaling ({base['machine']['device']}, {base['machine']['date']})", ""]
    lines += [f"Settings: {json.dumps(base['settings'])}", ""]
    lines += ["Wall: reference run + evaluations; sweep: evaluations (and, on many GPUs, the merge).", ""]
    lines += ["| GPUs | evaluations | wall s | sweep s | speed-up (sweep) | efficiency |", "|---|---|---|---|---|---|"]
    table = []
    for run in runs:
        n = run.get("world_size", 1)
        speedup = base["sweep_seconds"] / run["sweep_seconds"]
        evaluations = run.get("evaluations") or len(run["rows"])
        table.append({"gpus": n, "evaluations": evaluations, "wall_seconds": run["wall_seconds"]}
                     | {"sweep_seconds": run["sweep_seconds"], "speedup": speedup, "efficiency": speedup / n})  # fmt: skip
        lines.append(f"| {n} | {evaluations} | {run['wall_seconds']:.1f} | {run['sweep_seconds']:.1f} | "
                     f"{speedup:.2f}x | {speedup / n:.0%} |")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": table, "settings": base["settings"]}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="PREFIX: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--tiny", action="store_true", help="the embedded model on CPU (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda unless --tiny")
    parser.add_argument("--px", type=int, default=None, help="image size (default 512; --tiny: the model's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per evaluation (default 16; --tiny: 2)")
    parser.add_argument("--layers-per-group", type=int, default=None, help="sampled layers per group (default 3/1)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="scaling runs: part files (default: a temp dir)")
    parser.add_argument("--scaling", type=Path, nargs="+", default=None, help="JSONs of scaling runs to tabulate")
    args = parser.parse_args()
    if args.scaling:
        scaling(args.scaling, args.out)
        return
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; pass --tiny (or --device cpu) for a CPU run.")
    with process_group(args.device) as ctx:
        pipe = build_pipe(args)
        px = args.px or (pipe.default_sample_size * pipe.vae_scale_factor if args.tiny else 512)
        prompts = tuple(default_prompts()[: args.prompts or (2 if args.tiny else 16)])
        layers = layer_inventory(pipe.unet)
        chosen = sample_layers(layers, args.layers_per_group or (1 if args.tiny else 3))
        ranges = calibrate(pipe, list(prompts[:1]), num_inference_steps=1, height=px, width=px, progress=False)
        settings = SweepSettings(prompts=prompts, num_inference_steps=1, height=px, width=px, layers=chosen)
        report: dict[str, Any] = {
            "model": pipe.model_id,
            "machine": machine(args.device),
            "settings": {"px": px, "prompts": len(prompts), "steps": 1, "layers": list(chosen)}
            | {"dtype": str(pipe.unet.dtype)},
            "authors_seconds_per_eval": AUTHORS_SECONDS,
        }
        if ctx.distributed:
            many_gpus(args, pipe, ranges, settings, report, ctx)
        else:
            one_gpu(args, pipe, ranges, settings, report)
    if ctx.is_main:
        print(markdown(report))


if __name__ == "__main__":
    main()
