"""``python -m mixdq allocate``: a budget in, a PrecisionConfig (JSON, optionally MixDQ yaml) out."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from mixdq.allocate.allocator import (
    AUTO,
    BAND,
    INSIDE,
    METHODS,
    PROTECTED_WEIGHTS,
    AllocationResult,
    Allocator,
    BelowUniformWidthWarning,
)
from mixdq.allocate.exact import MIP_GAP
from mixdq.config import FP8_CHOICES, WEIGHT_CLIPS
from mixdq.inventory import UNetInventory, inventory_from_unet_config
from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from mixdq.sensitivity.published import (
    SDXL_TURBO_MODEL_ID,
    load_published_table,
    sdxl_turbo_inventory,
)
from mixdq.sensitivity.table import PROTECTED_SHARE, SensitivityTableError, read_table, select_protected

EMBEDDED_SOURCE = "embedded"
PUBLISHED_SOURCE = "published-sdxl-turbo"
EMBEDDED_TABLE = EMBEDDED_MODEL_DIR / "sensitivity.csv"  # the shipped sweep (see the README)

EPILOG = f"""\
examples:
  python -m mixdq allocate --budget-bits 4.0 --out w4a8.json         # the embedded model's shipped sweep
  python -m mixdq allocate --source sens.csv --budget-mb 4.4 --out w4a8.json  # your sweep of the embedded model
  python -m mixdq allocate --source {PUBLISHED_SOURCE} --budget-mb 1300 --act-bits 8 --k 0.62 --solver highs \
      --out turbo.json --yaml-out turbo                                 # SDXL-Turbo, the MixDQ authors' data
  python -m mixdq allocate --source assets/tiny-sdxl/sensitivity.csv --unet-config assets/tiny-sdxl \
      --budget-bits 4 --select-k embedded --out tiny_w4a8.json       # K chosen by generated images

Weight budgets in bits are size-weighted averages over all quantizable layers, protected layers counted
as 16 bits, met within the band (--protected-weights outside: over the other layers only; act_only:
MixDQ's search, protected layers' weights quantized too). --act-bits averages over the non-protected
layers only (activations cost no memory): 8 puts every one of them at 8 bits. --budget-mb caps the whole UNet's weight memory (codes, FP16 scales and
biases, FP16 protected layers and norms; 1 MB = 1e6 bytes). K = content bits / quality bits; "{AUTO}"
picks the K with the best size-weighted normalized sensitivity. Exact solvers stop within {MIP_GAP:g}
of the optimum in normalized units (1 = all layers from lowest to highest bits)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``allocate`` sub-command; its handler is ``args.handler``."""
    parser = subparsers.add_parser(
        "allocate",
        help="choose per-layer bits for a memory budget (MixDQ integer program)",
        description="Choose per-layer weight and activation bits with MixDQ's per-group integer programs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, metavar="BITS", help="average weight bits, e.g. 4.0")
    budget.add_argument("--budget-mb", type=float, metavar="MB", help="UNet weight memory in MB, e.g. 1300")
    parser.add_argument(
        "--act-bits",
        type=_act_bits,
        default=8.0,
        metavar="BITS|fp16",
        help="average activation bits over the non-protected layers (default: 8.0, all at 8); 'fp16' keeps them unquantized",
    )
    parser.add_argument(
        "--k", type=_k_value, default=AUTO, help=f"weight K = b_content / b_quality, or '{AUTO}' (default)"
    )
    parser.add_argument("--act-k", type=_k_value, default=AUTO, help=f"activation K, or '{AUTO}' (default)")
    parser.add_argument(
        "--solver",
        choices=METHODS,
        default="cbc",
        help="exact ILP (cbc, highs) or the greedy preview (approx); default: cbc",
    )
    parser.add_argument(
        "--source",
        default=EMBEDDED_SOURCE,
        help=f"'{EMBEDDED_SOURCE}' (default: the embedded model's shipped sweep, for the model `generate` loads by "
        f"default), '{PUBLISHED_SOURCE}' (SDXL-Turbo, the MixDQ authors' data) or a sensitivity table CSV",
    )
    parser.add_argument(
        "--unet-config",
        type=Path,
        metavar="PATH",
        help="with a table --source: the UNet config.json (or diffusers model folder) of the model the table was "
        "measured on; default: the embedded model's",
    )
    parser.add_argument(
        "--protect-share",
        type=float,
        default=PROTECTED_SHARE,
        help=f"share of most activation-sensitive layers kept in FP16 (default: {PROTECTED_SHARE})",
    )
    parser.add_argument(
        "--protected-weights",
        choices=PROTECTED_WEIGHTS,
        default=INSIDE,
        help="the protected layers' weights: FP16 and counted at 16 bits in --budget-bits (inside, default), FP16 "
        "and not counted (outside: 8 then puts every other layer at 8), or quantized like any other layer with "
        "only their activations FP16 (act_only, MixDQ's own configs)",
    )
    parser.add_argument(
        "--band", type=float, default=BAND, help=f"tolerance on each group's average bits (default: {BAND})"
    )
    parser.add_argument(
        "--select-k",
        metavar="MODEL",
        help="choose the weight K by generating images (MixDQ's last search step; mixdq.evaluate.select_k) with "
        "MODEL ('embedded', a folder or a hub id, matching --source): candidate K over the feasible range plus "
        "auto K, ranked by PSNR vs FP on held-out prompts. Replaces --k",
    )
    parser.add_argument(
        "--validation-prompts",
        type=int,
        default=16,
        metavar="N",
        help="with --select-k: the last N captions of assets/prompts.txt score the candidates (default: 16)",
    )
    parser.add_argument(
        "--calibration-prompts",
        type=int,
        metavar="N",
        help="with --select-k: the first N captions calibrate activations (default: all but the validation ones)",
    )
    parser.add_argument("--validation-steps", type=int, default=4, help="with --select-k: sampling steps (default 4)")
    parser.add_argument(
        "--weight-clip",
        choices=WEIGHT_CLIPS,
        default="minmax",
        help="weight scales: minmax (MixDQ, default) or mse (per-row MSE clipping; JSON only, not MixDQ yaml)",
    )
    parser.add_argument(
        "--fp8",
        choices=tuple(FP8_CHOICES),
        default="none",
        help="FP8 e4m3 instead of int8 (faster on Hopper / Ada GPUs once deployed; JSON only, not MixDQ yaml): "
        "'w8a8' the W8A8 linears, 'a8' every A8 linear (activations, and 8-bit weights; 4/2-bit weights keep "
        "their integer grid); default none",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the PrecisionConfig JSON")
    parser.add_argument(
        "--yaml-out", metavar="PREFIX", help="also write MixDQ yaml: PREFIX_weight.yaml, PREFIX_act.yaml"
    )
    parser.set_defaults(handler=run_allocate)
    return parser


def run_allocate(args: argparse.Namespace) -> int:
    """Run the allocation; 0 on success, 2 with a message on stderr for a bad budget or input."""
    if args.yaml_out and args.weight_clip != "minmax":
        print(
            "error: MixDQ yaml (--yaml-out) has min-max weight scales only; drop --weight-clip or --yaml-out.",
            file=sys.stderr,
        )
        return 2
    if args.yaml_out and args.fp8 != "none":
        print("error: MixDQ yaml (--yaml-out) has no FP8 e4m3; drop --fp8 or --yaml-out.", file=sys.stderr)
        return 2
    try:
        allocator = _allocator(args)
        with warnings.catch_warnings():  # printed below as one line, with the summary
            warnings.simplefilter("ignore", BelowUniformWidthWarning)
            if args.select_k:
                result = _select_k(args, allocator)
            else:
                result = allocator.allocate(
                    weight_bits=args.budget_bits,
                    weight_mb=args.budget_mb,
                    act_bits=args.act_bits,
                    k=args.k,
                    act_k=args.act_k,
                    solver=args.solver,
                )
        config = result.config.with_run_options(list(allocator.inventory.layers), args.weight_clip, args.fp8)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config.save(args.out)
    if args.yaml_out:
        stem = Path(args.yaml_out)
        config.save_mixdq_yaml(stem.parent, stem.name, list(allocator.inventory.layers))
    print(_summary(result))
    if result.below_uniform is not None:
        print(f"warning: {result.below_uniform.message}", file=sys.stderr)
    return 0


def _allocator(args: argparse.Namespace) -> Allocator:
    if args.source in (EMBEDDED_SOURCE, PUBLISHED_SOURCE) and args.unet_config is not None:
        raise ValueError(f"--unet-config is for a table --source; '{args.source}' brings its model's layers.")
    if args.source == PUBLISHED_SOURCE:
        table, inventory, model_id = load_published_table(), sdxl_turbo_inventory(), SDXL_TURBO_MODEL_ID
    else:
        # A table describes the model `sensitivity` swept: by default, like there, the embedded one.
        table = read_table(EMBEDDED_TABLE if args.source == EMBEDDED_SOURCE else args.source)
        embedded = args.unet_config is None
        inventory = _table_inventory(EMBEDDED_MODEL_DIR if embedded else args.unet_config)
        model_id = EMBEDDED_MODEL_ID if embedded else ""
    protected = select_protected(table, args.protect_share) if args.protect_share > 0 else []
    try:
        return Allocator(
            table, protected, inventory, band=args.band, model_id=model_id, protected_weights=args.protected_weights
        )
    except SensitivityTableError as err:
        model = args.unet_config or f"the embedded model ({EMBEDDED_MODEL_DIR})"
        raise ValueError(
            f"--source {args.source}: {err} It does not describe {model}; pass --unet-config PATH of the model "
            "it was measured on (a diffusers model folder or its unet/config.json)."
        ) from None


def _select_k(args: argparse.Namespace, allocator: Allocator) -> AllocationResult:
    """The allocation at the K whose validation images are closest to FP (prints every candidate's score)."""
    from mixdq.calibrate import default_prompts
    from mixdq.evaluate import select_k
    from mixdq.models import ModelNotAvailableError, load_pipeline

    if args.k != AUTO:
        raise ValueError("--select-k chooses K by generating images; drop --k (or drop --select-k to fix K).")
    prompts = default_prompts()
    n = args.validation_prompts
    if not 0 < n < len(prompts):
        raise ValueError(f"--validation-prompts must lie in 1..{len(prompts) - 1} ({len(prompts)} captions ship).")
    calibration = prompts[: len(prompts) - n][: args.calibration_prompts]
    bits = args.budget_bits if args.budget_bits is not None else allocator.mb_to_bits(args.budget_mb)
    try:
        pipe = load_pipeline(None if args.select_k == "embedded" else args.select_k)
    except ModelNotAvailableError as err:
        raise ValueError(str(err)) from None
    selection = select_k(
        pipe, allocator, bits, args.act_bits, prompts[-n:], seeds=0, num_inference_steps=args.validation_steps,
        calibration_prompts=calibration, solver=args.solver if args.solver != "approx" else "cbc",
        weight_clip=args.weight_clip,
    )  # fmt: skip
    columns = [c for c in ("k", "auto", "content_bits", "quality_bits", selection.metric) if c in selection.table]
    print(selection.table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"chosen K = {selection.k:.4f} ({selection.metric} on {n} validation prompts)")
    return selection.result


def _table_inventory(path: Path) -> UNetInventory:
    config = path / "unet" / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ValueError(f"--unet-config: no UNet config at {config}; pass a config.json or a diffusers model folder.")
    return inventory_from_unet_config(config)


def _summary(result: AllocationResult) -> str:
    lines = []
    for side in (result.weight, result.act):
        if side is None:
            continue
        groups = ", ".join(f"{g.group} {g.average:.3f}" for g in side.groups.values())
        lines.append(
            f"{side.target}: {side.average_bits:.3f} average bits (budget {side.budget_bits:.3f}; {groups}), "
            f"K={side.k:.3f}, {side.solver} {side.status} in {side.seconds:.2f} s"
        )
    if result.weight_mb is not None:
        lines.append(f"UNet weights: {result.weight_mb:.1f} MB")
    weight = result.weight
    if weight.overall_bits != weight.average_bits:
        lines.append(
            f"weights over every layer, FP16 protected ones at 16 bits: {weight.overall_bits:.3f} average bits"
        )
    return "\n".join(lines)


def _act_bits(text: str) -> float | None:
    return None if text.lower() == "fp16" else _positive(text, "--act-bits")


def _k_value(text: str) -> float | str:
    return AUTO if text == AUTO else _positive(text, "K")


def _positive(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: {text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{option}: {text!r} must be positive")
    return value
