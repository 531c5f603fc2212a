"""MixDQ's ablation, reproduced on the embedded model: quality of every step of the method against FP.

    python bench/quality.py                       # the committed table (256 prompts x 4 and 1 steps, CPU)
    python bench/quality.py --merge-content-sqnr  # once: add the content-layer SQNR rows to the shipped table
    python bench/quality.py --steps 4 --rows "MixDQ W4A8" \
        --content-sensitivity bench/results/tiny_content_ssim_4steps.csv --out bench/results/quality_content4
                                                  # content layers scored at 4 steps (sweep_embedded --group content)

Rows (each a precision config evaluated by :func:`mixdq.evaluate.evaluate` with identical noise per prompt):
FP | naive min-max W8A8 (BOS token quantized with the rest of the text embedding) | + BOS-aware W8A8 |
+ mixed precision scored by one metric (UNet-output SQNR for every layer, ~W4A8) | MixDQ (metric-decoupled)
at W8A8, W5A8, W4A8 and W3.66A16 | uniform W4A8 at MixDQ W4A8's memory.

K (content bits / quality bits) of every mixed-precision row is chosen as MixDQ's search does in its last step:
the integer program's allocations at a few K are generated and ranked by an image metric
(:func:`mixdq.evaluate.select_k`: PSNR vs FP), on *validation* captions drawn with their own seed, disjoint
from the reported captions. ``--k-selection auto`` uses the allocator's sensitivity-only auto K instead. Columns: UNet weight MB and ratio
vs FP16, CLIP score (the embedded tiny CLIP), Fréchet distance of CLIP features vs FP, alignment (the
rule-based checker reads back every attribute of the caption), SSIM and PSNR vs FP.

The single-metric row needs SQNR values for content layers, which the shipped table (made with MixDQ's
decoupled metrics) does not hold: they are swept here with the shipped sweep's settings (16 prompts,
1 step, seed 42, calibrated on all 64 prompts of assets/prompts.txt) and written to
``bench/results/tiny_content_sqnr.csv``.

The same rows for SDXL-Turbo, allocated from the MixDQ authors' published sensitivities, on a machine with its
weights (the uniform W8A8 JSON for the naive and BOS-aware rows comes from ``PrecisionConfig.uniform``)::

    python -m mixdq allocate --budget-bits 4.0 --out turbo_w4a8.json           # also 8.0, 5.0
    python -m mixdq allocate --budget-bits 3.66 --act-bits fp16 --out turbo_w366a16.json
    python -m mixdq evaluate --model stabilityai/sdxl-turbo --device cuda --steps 1 --size 512 \
        --prompts coco_captions.txt --calibration-prompts coco_calibration.txt \
        --clip ViT-L-14:/path/to/open_clip_pytorch_model.bin \
        --config naive=uniform_w8a8.json --naive naive --config W8A8=uniform_w8a8.json \
        --config MixDQ-W4A8=turbo_w4a8.json --config MixDQ-W3.66A16=turbo_w366a16.json --out quality_sdxl_turbo
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mixdq.allocate import Allocator
from mixdq.calibrate import calibrate, default_prompts
from mixdq.config import PrecisionConfig
from mixdq.evaluate import KSelection, embedded_checker, embedded_clip_scorer, evaluate, select_k
from mixdq.evaluate.runner import results_path
from mixdq.inventory import UNetInventory, layer_inventory, non_layer_param_count
from mixdq.models import EMBEDDED_MODEL_DIR, load_pipeline
from mixdq.sensitivity.sweep import SweepSettings, run_sweep
from mixdq.sensitivity.table import PROTECTED_SHARE, read_table, select_protected, validate_table
from mixdq.tiny.data import Scene, sample_scenes
from mixdq.tiny.evaluate_model import EVAL_SEED

SHIPPED_TABLE = EMBEDDED_MODEL_DIR / "sensitivity.csv"
RESULTS = Path(__file__).resolve().parent / "results"
CONTENT_SQNR_TABLE = RESULTS / "tiny_content_sqnr.csv"
# The shipped sweep's settings (assets/tiny-sdxl/sensitivity.json), so the new rows compare with the old ones.
SWEEP_PROMPTS, SWEEP_STEPS, SWEEP_SEED = 16, 1, 42
SQNR_ONLY = {"content": "sqnr", "quality": "sqnr"}
ACT_BUDGET = 8.0  # over the non-protected layers: every one of them at 8 bits
# Validation captions for choosing K: their own seed, apart from the reported (EVAL_SEED), training, checker,
# grid and calibration-prompt seeds of mixdq.tiny.
VALIDATION_SEED = 5_000_003
K_SELECTION = ("images", "auto")


def content_sqnr_rows(pipe) -> tuple[pd.DataFrame, dict]:
    """UNet-output SQNR of every content layer at every weight and activation bit, and the sweep's report."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    ranges = calibrate(
        pipe, default_prompts(), num_inference_steps=SWEEP_STEPS, seed=SWEEP_SEED, height=size, width=size
    )
    content = tuple(info.name for info in layer_inventory(pipe.unet) if info.group == "content")
    settings = SweepSettings(
        prompts=tuple(default_prompts()[:SWEEP_PROMPTS]),
        num_inference_steps=SWEEP_STEPS,
        seed=SWEEP_SEED,
        height=size,
        width=size,
        layers=content,
        metrics="sqnr",
    )
    table, stats = run_sweep(pipe, ranges, settings, act_ranges_key=ranges.provenance["prompts_sha256"])
    report = {
        "what": "content-layer UNet-output SQNR rows for the single-metric ablation (bench/quality.py)",
        "model_id": pipe.model_id,
        "device": _machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("prompts", "layers")}
        | {"num_prompts": SWEEP_PROMPTS, "num_layers": len(content)},
        "evaluations": stats.evaluations,
        "sweep_seconds": stats.seconds,
        "seconds_per_eval": stats.seconds_per_eval,
    }
    return table, report


def load_content_sqnr(pipe) -> pd.DataFrame:
    """The content SQNR rows: from the results file, else swept now (a few minutes on a CPU) and written there."""
    if CONTENT_SQNR_TABLE.is_file():
        return read_table(CONTENT_SQNR_TABLE)
    table, report = content_sqnr_rows(pipe)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(CONTENT_SQNR_TABLE, index=False)
    CONTENT_SQNR_TABLE.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return table


def merge_into_shipped(extra: pd.DataFrame) -> bool:
    """Append ``extra`` to the shipped table if every existing byte stays as it is and the result validates.

    Appending (rather than rewriting) keeps the existing rows byte-identical whatever pandas' float
    formatting does; the merged text is validated and read back before it replaces the file.
    """
    old_text = SHIPPED_TABLE.read_text()
    old = read_table(SHIPPED_TABLE)
    if ((old["group"] == "content") & (old["metric"] == "sqnr")).any():
        print(f"{SHIPPED_TABLE} already holds content SQNR rows; nothing to merge.")
        return False
    body = extra.to_csv(index=False, header=False)
    merged_text = old_text + ("" if old_text.endswith("\n") else "\n") + body
    tmp = SHIPPED_TABLE.with_suffix(".merged.csv")
    tmp.write_text(merged_text)
    try:
        merged = read_table(tmp)
        same = merged.iloc[: len(old)].reset_index(drop=True).equals(old)
        if not (merged_text.startswith(old_text) and same and len(merged) == len(old) + len(extra)):
            print("merge would change existing rows; left the shipped table alone.")
            return False
        tmp.replace(SHIPPED_TABLE)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"appended {len(extra)} content SQNR rows to {SHIPPED_TABLE}")
    return True


def held_out_prompts(count: int, seed: int = EVAL_SEED) -> tuple[list[str], list[Scene]]:
    """``count`` held-out captions, half with one object and half with two (by default the first ``count / 2``
    of the caption lists :mod:`mixdq.tiny.evaluate_model` scores the model card on), and their ground truth."""
    per_count = count // 2
    scenes: list[Scene] = []
    for objects in (1, 2):
        scenes += sample_scenes(per_count, np.random.default_rng(seed + objects), object_counts=(objects,)).scenes
    return [scene.caption() for scene in scenes], scenes


def validation_prompts(count: int, exclude: Collection[str] = ()) -> list[str]:
    """Captions that choose K: half 1-object, half 2-object, from :data:`VALIDATION_SEED`, none of them in
    ``exclude`` (the reported captions: the small 1-object caption space repeats captions across seeds)."""
    prompts: list[str] = []
    for objects in (1, 2):
        rng = np.random.default_rng(VALIDATION_SEED + objects)
        kept: list[str] = []
        while len(kept) < count // 2:
            scene = sample_scenes(1, rng, object_counts=(objects,)).scenes[0]
            if scene.caption() not in exclude:
                kept.append(scene.caption())
        prompts += kept
    return prompts


def replace_content_rows(table: pd.DataFrame, swept: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its content-layer rows of each metric ``swept`` holds replaced by ``swept``'s content rows."""
    swept = swept[swept["group"] == "content"]
    replaced = (table["group"] == "content") & table["metric"].isin(swept["metric"].unique())
    return validate_table(pd.concat([table[~replaced], swept], ignore_index=True))


def ablation_configs(
    pipe,
    table: pd.DataFrame,
    choose_k: Callable[..., PrecisionConfig] | None = None,
    rows: list[str] | None = None,
    k: float | str = "auto",
) -> tuple[dict[str, PrecisionConfig | None], dict[str, bool], dict[str, str]]:
    """The ablation's configs in table order, which of them skip BOS handling, and how each was made.

    ``rows``: only these labels (and FP, the reference) are built; None = all.

    ``choose_k(allocator, weight_bits, act_bits, weight_clip)`` makes each mixed-precision config (e.g. by
    :func:`mixdq.evaluate.select_k`); ``None`` allocates at ``k``: the allocator's auto K, or a fixed value.
    Memory matching: uniform W4A8 has 4.00 average weight bits with no FP16 layer; MixDQ W4A8 is allocated at
    an overall 4.00 average bits with its protected layers counted at 16, met within MixDQ's ±0.02-bit band,
    so the two differ by at most that band (the table shows both MB).
    """
    layers = layer_inventory(pipe.unet)
    inventory = UNetInventory(tuple(layers), non_layer_param_count(pipe.unet))
    mixdq = Allocator(
        table, protected=select_protected(table, PROTECTED_SHARE), inventory=inventory, model_id=pipe.model_id
    )
    single = Allocator(
        table,
        protected=select_protected(table, PROTECTED_SHARE, metrics=SQNR_ONLY),
        inventory=inventory,
        model_id=pipe.model_id,
        metrics=SQNR_ONLY,
    )

    def allocated(
        allocator: Allocator, weight_bits: float, act_bits: float | None, weight_clip: str = "minmax"
    ) -> PrecisionConfig:
        if choose_k is not None:
            return choose_k(allocator, weight_bits, act_bits, weight_clip)
        config = allocator.allocate(weight_bits=weight_bits, act_bits=act_bits, k=k, solver="cbc").config
        config.weight_clip = weight_clip
        return config

    def mse_clipped(config: PrecisionConfig) -> PrecisionConfig:
        config.weight_clip = "mse"
        return config

    uniform_w8a8 = lambda: PrecisionConfig.uniform(layers, 8, 8, model_id=pipe.model_id)
    builders: dict[str, Callable[[], PrecisionConfig | None]] = {
        "FP": lambda: None,
        "naive W8A8 (no BOS)": uniform_w8a8,
        "+ BOS-aware W8A8": uniform_w8a8,
        "+ MP, SQNR only, W4A8": lambda: allocated(single, 4.0, ACT_BUDGET),
        "MixDQ W8A8": lambda: allocated(mixdq, 8.0, ACT_BUDGET),
        "MixDQ W5A8": lambda: allocated(mixdq, 5.0, ACT_BUDGET),
        "MixDQ W4A8": lambda: allocated(mixdq, 4.0, ACT_BUDGET),
        "MixDQ W3.66A16": lambda: allocated(mixdq, 3.66, None),
        "uniform W4A8 (BOS-aware)": lambda: PrecisionConfig.uniform(layers, 4, 8, model_id=pipe.model_id),
        "BOS-aware W8A8 (FP8 linears)": lambda: uniform_w8a8().with_fp8_linears(layers),
        "MixDQ W4A8 (FP8 8-bit linears)": lambda: allocated(mixdq, 4.0, ACT_BUDGET).with_fp8_linears(layers),
        "MixDQ W4A8 (FP8 A8 linears)": lambda: allocated(mixdq, 4.0, ACT_BUDGET).with_fp8_linears(layers, low_bit=True),
        "MixDQ W8A8 + MSE clip": lambda: allocated(mixdq, 8.0, ACT_BUDGET, "mse"),
        "MixDQ W4A8 + MSE clip": lambda: allocated(mixdq, 4.0, ACT_BUDGET, "mse"),
        "uniform W4A8 + MSE clip": lambda: mse_clipped(PrecisionConfig.uniform(layers, 4, 8, model_id=pipe.model_id)),
    }
    unknown = set(rows or ()) - set(builders)
    if unknown:
        raise SystemExit(f"unknown --rows {sorted(unknown)}; the rows are: {', '.join(builders)}")
    configs = {label: build() for label, build in builders.items() if rows is None or label in {"FP", *rows}}
    if choose_k is not None:
        k_how = "K chosen by image validation (see below)"
    else:
        k_how = "auto K" if k == "auto" else f"K fixed at {k:g}"
    how = {
        "FP": "the pipeline in float32, no layer quantized",
        "naive W8A8 (no BOS)": "every layer W8A8 min-max; BOS token quantized with the text embedding (calibrated that way)",
        "+ BOS-aware W8A8": "every layer W8A8 min-max; attn2.to_k/to_v skip token 0 (FP K/V for BOS)",
        "+ MP, SQNR only, W4A8": f"ILP at 4.0 avg weight bits, every non-protected activation at 8 bits; every layer scored by UNet-output SQNR; 1% protected chosen by SQNR; {k_how}",
        "MixDQ W8A8": f"ILP at 8.0 avg weight bits (protected at 16), every non-protected activation at 8 bits; content SSIM / quality SQNR; 1% protected; {k_how}",
        "MixDQ W5A8": "as MixDQ W8A8 at 5.0 avg weight bits",
        "MixDQ W4A8": "as MixDQ W8A8 at 4.0 avg weight bits",
        "MixDQ W3.66A16": "as MixDQ W8A8 at 3.66 avg weight bits, activations FP",
        "uniform W4A8 (BOS-aware)": "every layer W4A8 min-max, BOS-aware, nothing protected: 4.00 avg bits",
        "BOS-aware W8A8 (FP8 linears)": "+ BOS-aware W8A8 with every linear layer in FP8 e4m3 (per-tensor scales), "
        "convs int8: what the FP8 deploy backend runs on Hopper/Ada GPUs",
        "MixDQ W4A8 (FP8 8-bit linears)": "MixDQ W4A8 with its W8A8 linear layers in FP8 e4m3",
        "MixDQ W4A8 (FP8 A8 linears)": "MixDQ W4A8 with every A8 linear layer's activations in FP8 e4m3 (its 8-bit "
        "weights too; 4- and 2-bit weights keep their integer grid): what deploy's W4A8 FP8 path runs",
        "MixDQ W4A8 + MSE clip": "MixDQ W4A8's allocation (same sensitivities) with per-row MSE-clipped weight "
        "scales instead of min-max (ours, not the paper's); K chosen as for MixDQ W4A8, with these scales",
        "MixDQ W8A8 + MSE clip": "MixDQ W8A8's allocation with per-row MSE-clipped weight scales",
        "uniform W4A8 + MSE clip": "uniform W4A8 (BOS-aware) with per-row MSE-clipped weight scales",
    }
    bos_aware = {label: False for label in ("naive W8A8 (no BOS)",) if label in configs}
    return configs, bos_aware, {label: how[label] for label in configs}


def markdown(tables: dict[int, pd.DataFrame], header: list[str]) -> str:
    """The committed table: one section per step count, alignment also as points vs FP."""
    lines = header[:]
    for steps, table in tables.items():
        n = int(table.attrs["num_prompts"])
        fp = table.loc[table["config"] == "FP"].iloc[0]
        lines += [
            "",
            f"### {steps} step{'s' if steps > 1 else ''}, {n} prompts",
            "",
            "| config | avg W bits | UNet MB | × smaller | CLIP score | FD vs FP | alignment % | Δ vs FP (pts) | SSIM | PSNR dB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        paired = "alignment_delta_se" in table
        for row in table.itertuples():
            psnr = "∞" if np.isinf(row.psnr_db) else f"{row.psnr_db:.2f}"
            delta = f"{100 * (row.alignment - fp.alignment):+.1f}"
            if paired and row.config != "FP" and np.isfinite(row.alignment_delta_se):  # ± paired SE, lost / gained
                delta += f" ± {100 * row.alignment_delta_se:.1f} ({row.aligned_lost:.0f}↓ {row.aligned_gained:.0f}↑)"
            lines.append(
                f"| {row.config} | {row.avg_weight_bits:.2f} | {row.weight_mb:.2f} | {row.weight_ratio:.2f} | "
                f"{row.clip_score:.2f} | {row.fd:.4f} | {100 * row.alignment:.1f} | "
                f"{delta} | {row.ssim:.4f} | {psnr} |"
            )
        se = 100 * np.sqrt(fp.alignment * (1 - fp.alignment) / n)
        lines.append("")
        lines.append(f"Binomial standard error of one alignment number at {n} prompts: ±{se:.1f} points.")
        if paired:
            lines.append(
                "Δ ± its standard error over the same prompts (paired), and the prompts FP aligns that the config "
                "does not (↓) and the reverse (↑)."
            )
    return "\n".join(lines) + "\n"


def k_selection_markdown(selections: dict[str, KSelection]) -> str:
    """Every K candidate of every mixed-precision row, with the validation score that ranked it."""
    if not selections:
        return ""
    lines = ["", "### K selection (validation captions, not the reported ones)", ""]
    for label, sel in selections.items():
        lines += [
            f"**{label}** (chosen K = {sel.k:.3f}):",
            "",
            "| K | auto K | content bits | quality bits | SSIM | PSNR dB |",
            "|---|---|---|---|---|---|",
        ]
        for row in sel.table.itertuples():
            mark = "**" if row.k == sel.k else ""
            lines.append(
                f"| {mark}{row.k:.3f}{mark} | {'yes' if row.auto else ''} | {row.content_bits:.2f} | "
                f"{row.quality_bits:.2f} | {row.ssim:.4f} | {row.psnr_db:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _count(args: argparse.Namespace, steps: int) -> int:
    """Reported prompts at ``steps`` steps."""
    return args.prompts if steps != 1 or args.prompts_1step is None else args.prompts_1step


def _machine() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--prompts", type=int, default=256, help="held-out prompts at 4 steps (half 1-, half 2-object; default 256)"
    )
    parser.add_argument("--prompts-1step", type=int, default=None, help="prompts at 1 step (default: as --prompts)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 1], help="step counts to evaluate (default 4 1)")
    parser.add_argument(
        "--calibration-prompts",
        type=int,
        default=32,
        help="first N of assets/prompts.txt calibrate each config (default 32)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "mixdq-studio", help="calibration cache"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "quality_embedded", help="writes OUT.json, OUT.md, OUT.csv"
    )
    parser.add_argument("--note", default="", help="a line for the results (e.g. what else loaded the machine)")
    parser.add_argument(
        "--k",
        type=float,
        default=None,
        help="a fixed K for every mixed-precision row (skips --k-selection), e.g. to compare two K on the same prompts",
    )
    parser.add_argument(
        "--k-selection",
        choices=K_SELECTION,
        default="images",
        help="images: choose K by generating validation images (default); auto: the allocator's auto K",
    )
    parser.add_argument(
        "--validation-prompts", type=int, default=64, help="validation captions per K candidate (default 64)"
    )
    parser.add_argument(
        "--validation-steps",
        type=int,
        default=None,
        help="steps of the validation images (default: the first of --steps)",
    )
    parser.add_argument(
        "--merge-content-sqnr",
        action="store_true",
        help="sweep (or read) the content SQNR rows, append them to the shipped table, exit",
    )
    parser.add_argument("--rows", help="comma-separated row labels to evaluate (FP always); default: every row")
    parser.add_argument(
        "--content-sensitivity", type=Path,
        help="a sweep table (bench/sweep_embedded.py --group content) whose content-layer rows replace the shipped "
        "table's, e.g. content layers scored at 4 steps instead of 1",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    shipped = read_table(SHIPPED_TABLE)
    has_content_sqnr = ((shipped["group"] == "content") & (shipped["metric"] == "sqnr")).any()
    extra = None if has_content_sqnr and not args.merge_content_sqnr else load_content_sqnr(pipe)
    if args.merge_content_sqnr:
        merge_into_shipped(extra)
        return
    table = shipped if extra is None else validate_table(pd.concat([shipped, extra], ignore_index=True))
    if args.content_sensitivity:
        table = replace_content_rows(table, read_table(args.content_sensitivity))
    selections: dict[str, KSelection] = {}
    choose_k = None
    if args.k is None and args.k_selection == "images":
        reported = {p for steps in args.steps for p in held_out_prompts(_count(args, steps))[0]}
        validation = validation_prompts(args.validation_prompts, exclude=reported)
        validation_steps = args.validation_steps or args.steps[0]

        def choose_k(
            allocator: Allocator, weight_bits: float, act_bits: float | None, weight_clip: str = "minmax"
        ) -> PrecisionConfig:
            chosen = select_k(
                pipe,
                allocator,
                weight_bits,
                act_bits,
                validation,
                seeds=0,
                num_inference_steps=validation_steps,
                calibration_prompts=default_prompts()[: args.calibration_prompts],
                cache_dir=args.cache_dir,
                batch_size=args.batch_size,
                progress=False,
                weight_clip=weight_clip,
            )
            label = f"{'SQNR-only' if allocator.metrics['content'] == 'sqnr' else 'MixDQ'} W{weight_bits:g}A{act_bits or 16:g}"
            if weight_clip != "minmax":
                label += f" ({weight_clip} clip)"
            selections[label] = chosen
            print(
                f"{label}: K={chosen.k:.4f} chosen by {chosen.metric}\n{chosen.table.drop(columns='config').to_string(index=False)}",
                flush=True,
            )
            return chosen.result.config

    rows = [label.strip() for label in args.rows.split(",")] if args.rows else None
    configs, bos_aware, how = ablation_configs(pipe, table, choose_k, rows, "auto" if args.k is None else args.k)
    if args.k is not None:
        how["K"] = f"fixed at {args.k:g} for every mixed-precision row (--k; no image validation)"
    if args.content_sensitivity:
        how["content sensitivity"] = f"content-layer rows from {args.content_sensitivity} instead of the shipped table"
    if selections:
        how["K selection"] = (
            "each mixed-precision row's K chosen among 5 values evenly spaced over the budget's feasible range plus "
            f"the allocator's auto K, by PSNR vs FP of {args.validation_prompts} validation captions (seed "
            f"{VALIDATION_SEED}, none of them a reported caption) at {validation_steps} step(s): "
            + "; ".join(f"{label} K={sel.k:.3f}" for label, sel in selections.items())
        )
    scorer = embedded_clip_scorer()

    tables: dict[int, pd.DataFrame] = {}
    seconds: dict[int, float] = {}
    for steps in args.steps:
        count = _count(args, steps)
        prompts, scenes = held_out_prompts(count)
        tick = time.perf_counter()
        tables[steps] = evaluate(
            pipe,
            configs,
            prompts,
            seeds=0,
            num_inference_steps=steps,
            scorer=scorer,
            checker=embedded_checker,
            attributes=scenes,
            calibration_prompts=default_prompts()[: args.calibration_prompts],
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            bos_aware=bos_aware,
        )
        seconds[steps] = time.perf_counter() - tick
        print(tables[steps].to_string(index=False), flush=True)
        # written after every step count, so a run stopped early still leaves what it finished
        elapsed = time.perf_counter() - started
        write_results(
            args.out, tables, seconds, elapsed, configs, bos_aware, how, args.calibration_prompts, args.note, selections
        )


def write_results(
    out: Path,
    tables: dict[int, pd.DataFrame],
    seconds: dict[int, float],
    seconds_total: float,
    configs: dict[str, PrecisionConfig | None],
    bos_aware: dict[str, bool],
    how: dict[str, str],
    calibration_prompts: int,
    note: str,
    selections: dict[str, KSelection] | None = None,
) -> None:
    """OUT.csv (every row, with its step count), OUT.json (rows, settings, configs) and OUT.md (the table)."""
    command = shlex.join(["python", *sys.argv])
    machine, date = _machine(), time.strftime("%Y-%m-%d")
    rows = pd.concat([t.assign(steps=s) for s, t in tables.items()], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(results_path(out, ".csv"), index=False)
    document = {
        "format": "mixdq-studio/quality-bench",
        "command": command,
        "machine": machine,
        "torch": torch.__version__,
        "date": date,
        "seconds_total": seconds_total,
        "seconds_per_step_count": seconds,
        "calibration_prompts": calibration_prompts,
        "note": note,
        "settings": {str(s): t.attrs for s, t in tables.items()},
        "how": how,
        "k_selection": {label: sel.summary() for label, sel in (selections or {}).items()},
        "bos_aware": {name: bos_aware.get(name, True) for name, c in configs.items() if c is not None},
        "rows": rows.to_dict(orient="records"),
        "configs": {name: c.to_dict() for name, c in configs.items() if c is not None},
    }
    results_path(out, ".json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    timings = ", ".join(f"{steps} step{'s' if steps > 1 else ''} {v / 60:.1f} min" for steps, v in seconds.items())
    header = [
        "# MixDQ ablation on the embedded model",
        "",
        (
            f"Command: `{command}` — machine: {machine}, torch {torch.__version__}, {date}; "
            f"total {seconds_total / 60:.1f} min ({timings})."
        ),
        "Held-out captions (half 1-object, half 2-object), noise seed i for prompt i, guidance 0, 128 px, float32;",
        f"each quantized config calibrated (its own weight bits, EMA min-max) on the first {calibration_prompts} prompts",
        "of assets/prompts.txt at the evaluated step count.",
        "CLIP score and FD use the embedded tiny CLIP; FD is between L2-normalised CLIP image features of a config's",
        "images and the FP images; alignment = the rule-based checker reads back every attribute of the caption.",
        "",
        *[f"* **{name}**: {text}" for name, text in how.items()],
        *(["", f"Note: {note}"] if note else []),
    ]
    results_path(out, ".md").write_text(markdown(tables, header) + k_selection_markdown(selections or {}))
    print(f"results -> {out}.{{json,md,csv}}", flush=True)


if __name__ == "__main__":
    main()
