"""The studio's Compare on a GPU, driven through ``studio.services`` exactly as the page drives it.

A full-size SDXL(-Turbo)-architecture pipeline with random weights (``mixdq.models.build_sdxl_random_pipeline``;
timing and memory do not depend on the values) or ``--model`` (a folder or hub id). For each config (W8A8 with
FP8 linears, MixDQ ~W4A8 with FP8 A8 linears, W4A16), as the page's Compare button does: deploy from the FP16
weights held once, render FP16 / simulated / deployed images from one noise, measure. Rows: the first click on
a config (deploy + CUDA-graph capture + images: the time a user waits after switching) and a second click
(same config: the deployed UNet is reused).

    python bench/gpu_studio.py --out $OUT/studio --px 512 1024

Writes ``<out>.json`` after every row and ``<out>.md`` at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixdq.config import PrecisionConfig
from mixdq.evaluate.compare import median_step_ms
from mixdq.memory import MB
from studio import services

MIXED_CONFIG = ROOT / "bench" / "configs" / "sdxl_turbo_w4a8.json"
PROMPT = "a large red circle on the left, on a blue background"
CONFIGS = ("W8A8 (FP8 linears)", "MixDQ ~W4A8 (FP8 A8 linears)", "W4A16")


def config_for(name: str, workspace: services.ModelWorkspace) -> PrecisionConfig:
    """The config and run options the page would send for ``name``."""
    if name == CONFIGS[0]:
        config, fp8 = PrecisionConfig.uniform(workspace.layers, 8, 8, model_id=workspace.model_id), True
    elif name == CONFIGS[1]:
        config, fp8 = PrecisionConfig.load(MIXED_CONFIG), True
        config.model_id = workspace.model_id
    else:
        config, fp8 = PrecisionConfig.uniform(workspace.layers, 4, None, model_id=workspace.model_id), False
    return services.with_run_options(config, workspace.inventory, "min-max (MixDQ)", fp8)


def row_of(name: str, px: int, click: int, seconds: float, out: dict) -> dict[str, Any]:
    result = out["result"]
    fp16, deployed, deploy = result.fp16, result.deployed, result.deploy
    return {
        "config": name,
        "px": px,
        "click": click,
        "click_seconds": round(seconds, 3),
        "compiled": deployed.compiled,
        "redeployed": result.redeployed,
        "deploy_seconds": round(deploy.seconds, 3),
        "capture_seconds_fp16": round(fp16.warmup_seconds, 3),
        "capture_seconds_deployed": round(deployed.warmup_seconds, 3),
        "timing_method": deployed.timing_method,
        "step_ms_fp16": round(median_step_ms(fp16), 3),
        "step_ms_deployed": round(median_step_ms(deployed), 3),
        "speedup": round(median_step_ms(fp16) / median_step_ms(deployed), 3),
        "image_seconds_fp16": round(fp16.seconds, 4),
        "image_seconds_deployed": round(deployed.seconds, 4),
        "unet_fp16_mb": round(result.fp16_bytes / MB, 1),
        "unet_deployed_measured_mb": round(result.measured_bytes / MB, 1),
        "unet_deployed_accounted_mb": round(result.accounted_bytes / MB, 1),
        "peak_mb_fp16": None if fp16.peak_bytes is None else round(fp16.peak_bytes / MB),
        "peak_mb_deployed": None if deployed.peak_bytes is None else round(deployed.peak_bytes / MB),
        "psnr_deployed_vs_fp16": round(result.deployed_vs_fp16["psnr"], 2),
        "psnr_simulated_vs_fp16": round(result.simulated_vs_fp16["psnr"], 2),
        "psnr_deployed_vs_simulated": round(result.deployed_vs_simulated["psnr"], 2),
        "ssim_deployed_vs_simulated": round(result.deployed_vs_simulated["ssim"], 5),
        "deploy_report": deploy.report.describe(),
        "fused_attentions": deploy.fused_attentions,
        "grouped_blocks": deploy.grouped_blocks,
        "notes": list(result.notes),
    }


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        f"# Studio Compare on the kernels: {meta['device']}, {meta['date']}\n\n"
        f"`{meta['command']}` at commit {meta['commit']}; model {meta['model']}; {meta['steps']} step(s), batch 1, "
        "seed 0. GPU ms per UNet step: median over the image's steps, CUDA-graph replays timed with CUDA events, "
        "FP16 and deployed in the same process, both eager + CUDA graph, or both regionally compiled + CUDA graph "
        "where the row says compiled. Click 1 = a new "
        "config (deploy from the FP16 weights held once + compile where compiled + CUDA-graph capture + FP16 / "
        "simulated / deployed images); "
        "click 2 = the same config again.\n\n"
        "| config | px | click | click s | deploy s | capture s | FP16 ms | deployed ms | speed-up | image s FP16 / "
        "deployed | UNet MB FP16 / measured / accounted | peak MB FP16 / deployed | PSNR dep-FP16 / sim-FP16 / "
        "dep-sim |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {r['config']}{' (compiled)' if r.get('compiled') else ''} | {r['px']} | {r['click']} | {r['click_seconds']:.1f} | "
        f"{r['deploy_seconds'] if r['redeployed'] else '(reused)'} | {r['capture_seconds_deployed']:.1f} | "
        f"{r['step_ms_fp16']:.2f} | {r['step_ms_deployed']:.2f} | {r['speedup']:.2f}x | "
        f"{r['image_seconds_fp16']:.3f} / {r['image_seconds_deployed']:.3f} | "
        f"{r['unet_fp16_mb']:,.0f} / {r['unet_deployed_measured_mb']:,.0f} / {r['unet_deployed_accounted_mb']:,.0f} | "
        f"{r['peak_mb_fp16']} / {r['peak_mb_deployed']} | {r['psnr_deployed_vs_fp16']} / "
        f"{r['psnr_simulated_vs_fp16']} / {r['psnr_deployed_vs_simulated']} |"
        for r in rows
    ]
    reports = sorted({f"- {r['config']}: {r['deploy_report']}" for r in rows})
    return head + "\n".join(lines) + "\n\nDeploy reports:\n" + "\n".join(reports) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json / .md)")
    parser.add_argument("--model", default=None, help="folder or hub id; default: full-size SDXL, random weights")
    parser.add_argument("--save-model", type=Path, default=None, help="also save the random pipeline here")
    parser.add_argument("--px", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mixdq-cache"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument(
        "--compiled", action="store_true", help="the page's torch.compile option: FP16 and deployed compiled"
    )
    parser.add_argument("--commit", default="unknown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from mixdq.models import build_sdxl_random_pipeline, load_pipeline

    start = time.perf_counter()
    if args.model:
        pipe = load_pipeline(args.model, device=args.device)
    else:
        pipe = build_sdxl_random_pipeline(device=args.device)
        if args.save_model:
            pipe.save_pretrained(args.save_model)
    print(f"pipeline ready in {time.perf_counter() - start:.1f} s", flush=True)
    workspace = services.ModelWorkspace.from_pipeline(pipe, args.cache_dir)
    start = time.perf_counter()
    workspace.act_ranges(args.steps)  # what the page's first Compare does (cached on disk for later starts)
    calibration_seconds = time.perf_counter() - start
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/gpu_studio.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": args.commit,
        "model": args.model or pipe.model_id,
        "steps": args.steps,
        "calibration_seconds": round(calibration_seconds, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    rows: list[dict[str, Any]] = []
    for px in args.px:
        for name in args.configs:
            config = config_for(name, workspace)
            for click in (1, 2):
                begin = time.perf_counter()
                try:
                    out = workspace.compare(
                        config, PROMPT, 0, args.steps, px, on_stage=lambda s: print("  " + s), compiled=args.compiled
                    )
                except Exception as err:  # noqa: BLE001 - one failing config must not lose the others' rows
                    rows.append({"config": name, "px": px, "click": click, "error": f"{type(err).__name__}: {err}"})
                    print(f"{name} {px}: {rows[-1]['error']}", flush=True)
                    break
                rows.append(row_of(name, px, click, time.perf_counter() - begin, out))
                print(json.dumps(rows[-1]), flush=True)
                args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    good = [r for r in rows if "error" not in r]
    args.out.with_suffix(".md").write_text(markdown(meta, good))
    print(
        "median FP16 step ms by px:",
        {px: statistics.median(r["step_ms_fp16"] for r in good if r["px"] == px) for px in {r["px"] for r in good}},
    )
    return rows


if __name__ == "__main__":
    main()
