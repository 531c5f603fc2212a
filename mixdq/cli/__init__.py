"""``python -m mixdq``: calibrate, measure sensitivities, allocate bits, generate images and evaluate configs
from the shell."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from mixdq.cli.allocate import add_parser as add_allocate_parser
from mixdq.config import WEIGHT_BITS

# What --config accepts (mixdq.config_io.mixdq_yaml_pair has the rule for yaml pairs).
CONFIG_FORMS = "JSON, or a MixDQ yaml pair: STEM.weight.yaml (or STEM_weight.yaml), that STEM, or a folder of one pair"
# One cache for every command and the studio (app.py uses it too): `calibrate` fills it, `sensitivity` and
# `generate` read the same activation ranges back (they ask for them with calibrate's default settings).
DEFAULT_CACHE = Path(
    os.environ.get("MIXDQ_CACHE_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixdq-studio")
)
# `calibrate`'s defaults: 4 steps (SDXL-Turbo's few-step sampling, as `generate`), noise seed 0.
CALIBRATION_STEPS = 4
CALIBRATION_SEED = 0
# Commands that run the pipeline; `allocate` does too with --select-k.
TORCH_COMMANDS = ("calibrate", "generate", "sensitivity", "evaluate", "compare", "export")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="hub id or local folder of an SDXL pipeline (default: the embedded model)"
    )
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where calibration results are cached (default {DEFAULT_CACHE})",
    )


def _sampling_args(parser: argparse.ArgumentParser, steps: int, seed: int) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=steps,
        choices=range(1, 5),
        metavar="{1..4}",
        help=f"denoising steps (default {steps})",
    )
    parser.add_argument("--seed", type=int, default=seed, help=f"noise seed (default {seed})")
    parser.add_argument(
        "--size", type=int, default=None, help="image height and width in pixels (default: the model's)"
    )


def _read_prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts (one per line).")
    return prompts


def cmd_calibrate(args: argparse.Namespace) -> None:
    from mixdq.calibrate import calibrate
    from mixdq.distributed import main_print
    from mixdq.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    ranges = calibrate(
        pipe,
        prompts=_read_prompts(args.prompts),
        num_inference_steps=args.steps,
        seed=args.seed,
        height=args.size,
        width=args.size,
        weight_bits=args.weight_bits,
        cache_dir=args.cache_dir,
    )
    layers = len(next(iter(ranges.ranges.values())))
    main_print(f"activation ranges for {layers} layers at {sorted(ranges.ranges)} bits, cached in {args.cache_dir}")


def cmd_generate(args: argparse.Namespace) -> None:

    from mixdq.calibrate import calibrate
    from mixdq.config import PrecisionConfig
    from mixdq.inventory import layer_inventory
    from mixdq.models import generate_image, load_pipeline, read_prompt
    from mixdq.quant import quantization_off, quantize_

    if args.config is not None and _is_checkpoint(args.config):
        return _generate_from_checkpoint(args)
    # Read before the model loads, so that a bad file fails at once.
    config = PrecisionConfig.load(args.config) if args.config is not None else None
    pipe = load_pipeline(args.model, device=args.device)
    if config is not None:
        config.validate(layer_inventory(pipe.unet), pipe.model_id, source=str(args.config))
    size = args.size or pipe.default_sample_size * pipe.vae_scale_factor
    note = read_prompt(pipe, args.prompt).note
    if note:
        print(note)

    def run(tag: str) -> Path:
        return _save_image(args, generate_image(pipe, args.prompt, args.seed, args.steps, size)[0], tag)

    if config is None:
        print(run("fp"))
        return
    # The ranges `calibrate --steps N` made (8-bit weights upstream, as in the studio's Compare), not ones
    # made for this config: one calibration serves every config.
    ranges = calibrate(
        pipe, num_inference_steps=args.steps, seed=CALIBRATION_SEED, height=size, width=size, cache_dir=args.cache_dir
    )
    quantize_(pipe, config, ranges)
    print(run("quant"))
    with quantization_off(pipe):
        print(run("fp"))


def _is_checkpoint(path: Path) -> bool:
    from mixdq.deploy.checkpoint import is_checkpoint

    return is_checkpoint(path)


def _generate_from_checkpoint(args: argparse.Namespace) -> None:
    """``generate --config CHECKPOINT_FOLDER``: the checkpoint is the model (its FP16 UNet weights are not in it,
    so there is no FP image to write beside the quantized one)."""

    from mixdq.deploy.checkpoint import load_quantized
    from mixdq.models import generate_image

    if args.model is not None:
        raise SystemExit(f"error: {args.config} is a quantized checkpoint, which is the model; drop --model.")
    pipe = load_quantized(args.config, device=args.device)
    size = args.size or pipe.default_sample_size * pipe.vae_scale_factor
    image, reading = generate_image(pipe, args.prompt, args.seed, args.steps, size)
    if reading.note:
        print(reading.note)
    print(_save_image(args, image, "checkpoint"))


def _save_image(args: argparse.Namespace, image, tag: str) -> Path:
    """``OUT/<prompt slug>-seed<N>-<tag>.png``, the one naming of ``generate``'s images."""
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:60] or "image"
    path = args.out / f"{slug}-seed{args.seed}-{tag}.png"
    image.save(path)
    return path


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from mixdq.calibrate import calibrate, default_prompts
    from mixdq.distributed import current
    from mixdq.models import load_pipeline
    from mixdq.sensitivity.distributed import run_sweep_distributed
    from mixdq.sensitivity.sweep import SweepSettings, merge_shards, run_sweep
    from mixdq.sensitivity.table import read_table, write_table

    ctx = current()
    if args.merge:
        table = merge_shards([read_table(p) for p in args.merge])
        if ctx.is_main:
            print(f"merged {len(args.merge)} shards, {len(table)} rows -> {write_table(table, args.out)}")
        return
    index, count = args.shard
    if ctx.distributed and count > 1:
        raise SystemExit("error: --shard splits the sweep by hand; under torchrun the ranks split it (drop --shard).")
    pipe = load_pipeline(args.model, device=args.device)
    prompts = (_read_prompts(args.prompts) or default_prompts())[: args.num_prompts]
    size = args.size or pipe.default_sample_size * pipe.vae_scale_factor
    # The activation ranges `calibrate` made (its default steps and seed), whatever steps and seed the sweep
    # samples with: each layer is measured with the ranges it will be deployed with.
    ranges = calibrate(
        pipe,
        num_inference_steps=CALIBRATION_STEPS,
        seed=CALIBRATION_SEED,
        height=size,
        width=size,
        cache_dir=args.cache_dir,
    )
    settings = SweepSettings(
        prompts=tuple(prompts), num_inference_steps=args.steps, seed=args.seed, height=size, width=size
    )
    ranges_key = hashlib.sha256(json.dumps(ranges.provenance, sort_keys=True).encode()).hexdigest()[:16]
    if ctx.distributed:
        table, stats = run_sweep_distributed(
            pipe, ranges, settings, cache_dir=args.cache_dir, act_ranges_key=ranges_key
        )
    else:
        table, stats = run_sweep(
            pipe, ranges, settings, shard=(index, count), cache_dir=args.cache_dir, act_ranges_key=ranges_key
        )
    if not ctx.is_main:
        return
    write_table(table, args.out)
    equivalents = ", ".join(f"{m} {v:.1f}" for m, v in stats.unet_forward_equivalents().items())
    print(
        f"{stats.evaluations} evaluations in {stats.seconds:.1f} s; cost per layer x bit in batched UNet forwards: "
        f"{equivalents}; table -> {args.out}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mixdq.config import PrecisionConfig
    from mixdq.evaluate import embedded_checker, evaluate, save_results
    from mixdq.inventory import layer_inventory
    from mixdq.models import EMBEDDED_MODEL_DIR, load_pipeline

    names = [name for name, _ in args.config]
    for name in names:
        if name == "FP" or names.count(name) > 1:
            raise SystemExit(f"error: --config name {name!r} is used twice (the FP row is named 'FP').")
    unknown = sorted(set(args.naive) - set(names))
    if unknown:
        raise SystemExit(f"error: --naive {unknown[0]!r} is not a --config name; names: {names}.")
    configs: dict[str, PrecisionConfig | None] = {"FP": None}
    configs.update((name, PrecisionConfig.load(path)) for name, path in args.config)  # before the model loads
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    layers = layer_inventory(pipe.unet)
    for name, path in args.config:
        configs[name].validate(layers, pipe.model_id, source=str(path))
    prompts = _read_prompts(args.prompts)
    # The embedded model's captions carry their ground truth, so it gets the alignment checker and its CLIP.
    embedded = args.model is None or Path(args.model).resolve() == EMBEDDED_MODEL_DIR.resolve()
    if prompts is None:
        if not embedded:
            raise SystemExit("error: --prompts FILE is required for a model other than the embedded one.")
        from mixdq.calibrate import default_prompts

        prompts = default_prompts()
    scorer = _clip_scorer(args.clip, embedded)
    checker = embedded_checker if embedded else None
    table = evaluate(
        pipe,
        configs,
        prompts,
        seeds=args.seeds,
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        scorer=scorer,
        checker=checker,
        attributes=prompts if checker is not None else None,
        calibration_prompts=_read_prompts(args.calibration_prompts),
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        bos_aware={name: False for name in args.naive},
    )
    csv_path, json_path = save_results(table, args.out)
    print(table.to_string(index=False))
    print(f"results -> {csv_path}, {json_path}")


def _clip_scorer(spec: str | None, embedded: bool):
    """``None``: the embedded tiny CLIP for the embedded model, no CLIP metrics otherwise; ``none``; or
    ``ARCH:WEIGHTS`` for an open_clip model whose weights are a local file (nothing is downloaded)."""
    from mixdq.evaluate import OpenClipScorer, embedded_clip_scorer

    if spec is None:
        return embedded_clip_scorer() if embedded else None
    if spec == "none":
        return None
    if spec == "embedded":
        return embedded_clip_scorer()
    arch, _, weights = spec.partition(":")
    if not weights or not Path(weights).is_file():
        raise SystemExit(
            f"error: --clip {spec!r}: expected none, embedded or ARCH:PATH with PATH an existing weights file."
        )
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    return OpenClipScorer(model, preprocess, open_clip.get_tokenizer(arch))


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} must be NAME=path.json, e.g. W4A8=configs/w4a8.json")
    return name, Path(path)


def _shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"shard {text!r} must be i/n with 0 <= i < n, e.g. 0/2")
    return int(match[1]), int(match[2])


def cmd_compare(args: argparse.Namespace) -> None:
    """What the studio's Compare does, from the shell: FP16, simulated and deployed images with their costs."""
    import json

    from mixdq.calibrate import calibrate
    from mixdq.config import ConfigError, PrecisionConfig
    from mixdq.deploy.runner import DeployedRunner
    from mixdq.evaluate.compare import compare, median_step_ms
    from mixdq.evaluate.metrics import to_pil
    from mixdq.inventory import layer_inventory
    from mixdq.memory import MB
    from mixdq.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    try:
        config = PrecisionConfig.load(args.config)
        config.validate(layer_inventory(pipe.unet))
    except ConfigError as err:
        raise SystemExit(f"error: {args.config}: {err}") from None
    size = args.size or pipe.default_sample_size * pipe.vae_scale_factor
    ranges = calibrate(pipe, num_inference_steps=args.steps, cache_dir=args.cache_dir) if config.act_bits else None
    result = compare(DeployedRunner(pipe), config, ranges, args.prompt, args.seed, args.steps, size, print)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("fp16", "simulated", "deployed"):
        to_pil(getattr(result, name).image).save(args.out / f"{name}.png")
    summary = {
        "kernel_path": result.kernel_path,
        "deploy": result.deploy.report.describe(),
        "deploy_seconds": result.deploy.seconds,
        "step_ms": {"fp16": median_step_ms(result.fp16), "deployed": median_step_ms(result.deployed)},
        "timing_method": result.deployed.timing_method,
        "image_seconds": {"fp16": result.fp16.seconds, "deployed": result.deployed.seconds},
        "unet_mb": {
            "fp16": result.fp16_bytes / MB,
            "deployed": result.measured_bytes / MB,
            "accounted": result.accounted_bytes / MB,
        },
        "deployed_vs_fp16": result.deployed_vs_fp16,
        "simulated_vs_fp16": result.simulated_vs_fp16,
        "deployed_vs_simulated": result.deployed_vs_simulated,
        "notes": list(result.notes),
    }
    (args.out / "compare.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"images and compare.json in {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    """Calibrate (cached), deploy and save a quantized checkpoint folder that ``mixdq.load_quantized`` reads."""
    from mixdq.calibrate import calibrate
    from mixdq.config import PrecisionConfig
    from mixdq.deploy.checkpoint import export_checkpoint
    from mixdq.inventory import layer_inventory
    from mixdq.models import load_pipeline

    config = PrecisionConfig.load(args.config)  # before the model loads, so that a bad file fails at once
    pipe = load_pipeline(args.model, device=args.device)
    config.validate(layer_inventory(pipe.unet), pipe.model_id, source=str(args.config))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    # the ranges `calibrate` made with its defaults, as `generate` and the studio use them
    ranges = None
    if config.act_bits:
        ranges = calibrate(
            pipe, num_inference_steps=CALIBRATION_STEPS, seed=CALIBRATION_SEED, height=size, width=size,
            cache_dir=args.cache_dir,
        )  # fmt: skip
    folder, report = export_checkpoint(pipe, config, ranges, args.out, progress=True, in_place=True)
    print(report.describe())
    print(f"quantized checkpoint -> {folder} (load it with mixdq.load_quantized({str(folder)!r}))")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixdq",
        description="MixDQ mixed-precision quantization for few-step SDXL-style models. Typical flow: "
        "calibrate -> sensitivity -> allocate -> generate (each step caches its result).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="collect activation ranges (cached) for every layer and bit")
    _model_args(p)
    _sampling_args(p, steps=CALIBRATION_STEPS, seed=CALIBRATION_SEED)
    p.add_argument(
        "--prompts", type=Path, default=None, help="text file, one prompt per line (default: assets/prompts.txt)"
    )
    p.add_argument(
        "--weight-bits", type=int, default=8, choices=WEIGHT_BITS, help="weight bits while calibrating (default 8)"
    )
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("generate", help="write FP16 (and, with --config, quantized) images as PNG")
    _model_args(p)
    _sampling_args(p, steps=4, seed=0)
    p.add_argument("--prompt", required=True, help='e.g. "a red circle on the left, on a yellow background"')
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"precision config from `allocate` or the studio: {CONFIG_FORMS}; or a checkpoint folder from `export`",
    )
    p.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default ./outputs)")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("sensitivity", help="per-layer sensitivity sweep (SQNR for quality, SSIM for content layers)")
    _model_args(p)
    _sampling_args(p, steps=1, seed=42)
    p.add_argument(
        "--prompts", type=Path, default=None, help="text file, one prompt per line (default: assets/prompts.txt)"
    )
    p.add_argument("--num-prompts", type=int, default=16, help="prompts used from the list (default 16)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="run part i of n (e.g. 0/2); merge parts with --merge")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="merge shard tables (CSV) instead of sweeping")
    p.add_argument(
        "--out", type=Path, default=Path("sensitivity.csv"), help="table CSV to write (default ./sensitivity.csv)"
    )
    p.set_defaults(handler=cmd_sensitivity)

    p = sub.add_parser(
        "evaluate",
        help="FP vs quantized images from identical noise: memory, CLIP score, FD, alignment, SSIM/PSNR per config",
        description="Evaluate precision configs against FP on a prompt set: one row per config (FP first) with UNet "
        "weight MB, CLIP score, Fréchet distance of CLIP features vs FP, alignment (embedded model only), SSIM and "
        "PSNR vs FP. Example on SDXL-Turbo (needs its weights locally): python -m mixdq evaluate --model "
        "stabilityai/sdxl-turbo --config W4A8=w4a8.json --prompts coco.txt --calibration-prompts calib.txt "
        "--clip ViT-L-14:/path/open_clip_pytorch_model.bin --steps 1 --size 512 --out results/turbo",
    )
    _model_args(p)
    p.add_argument(
        "--config",
        type=_named_path,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"a precision config, repeatable: {CONFIG_FORMS}",
    )
    p.add_argument(
        "--naive",
        action="append",
        default=[],
        metavar="NAME",
        help="evaluate config NAME without BOS handling (MixDQ's naive baseline), repeatable",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="text file, one prompt per line (default for the embedded model: assets/prompts.txt)",
    )
    p.add_argument(
        "--calibration-prompts",
        type=Path,
        default=None,
        help="prompts for activation calibration (default: assets/prompts.txt)",
    )
    p.add_argument("--seeds", type=int, default=0, help="image i uses noise seed SEEDS + i (default 0)")
    p.add_argument(
        "--steps", type=int, default=1, choices=range(1, 5), metavar="{1..4}", help="denoising steps (default 1)"
    )
    p.add_argument("--size", type=int, default=None, help="image height and width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument(
        "--clip",
        default=None,
        help="none | embedded | ARCH:WEIGHTS_FILE (open_clip); default: embedded for the embedded model, else none",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="results stem: writes STEM.csv and STEM.json (default ./evaluation)",
    )
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "compare",
        help="FP16, fake-quant simulation and deployed (packed weights, kernels) images: times, memory, metrics",
    )
    _model_args(p)
    _sampling_args(p, steps=4, seed=0)
    p.add_argument("--prompt", required=True, help='e.g. "a red circle on the left, on a yellow background"')
    p.add_argument("--config", type=Path, required=True, help="precision config JSON (from `allocate` or the studio)")
    p.add_argument("--out", type=Path, default=Path("outputs/compare"), help="folder for the PNGs and compare.json")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "export", help="deploy a precision config and save it as a quantized checkpoint folder (packed weights)"
    )
    _model_args(p)
    p.add_argument("--config", type=Path, required=True, help=f"precision config: {CONFIG_FORMS}")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (a diffusers pipeline folder)")
    p.set_defaults(handler=cmd_export)

    add_allocate_parser(sub)
    return parser


@contextlib.contextmanager
def cpu_threads():
    """As app.py: torch on all cores but one unless OMP_NUM_THREADS says otherwise, so its OpenMP threads do not
    spin against each other and the rest of a busy machine (several times slower on 2 busy cores).
    The previous setting comes back afterwards, for callers of :func:`main` in a Python process."""
    import torch

    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- many processes: `torchrun --nproc-per-node N -m mixdq calibrate|sensitivity ...` (or accelerate launch) ----
# These commands split their work across the launcher's ranks (mixdq.distributed); the others would only run
# N copies of the same thing.
DISTRIBUTED_COMMANDS = frozenset({"calibrate", "sensitivity"})


def _process_group(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The launcher's process group around a distributed command; refuses the others under a launcher."""
    from mixdq.distributed import launched, process_group

    if args.command in DISTRIBUTED_COMMANDS:
        return process_group(args.device)
    if launched():
        raise SystemExit(
            f"error: {args.command} runs in one process; under torchrun only {sorted(DISTRIBUTED_COMMANDS)} run."
        )
    return contextlib.nullcontext()


# ---- end of the many-processes block ----


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mixdq.config import ConfigError
    from mixdq.models import ModelNotAvailableError

    runs_pipeline = args.command in TORCH_COMMANDS or getattr(args, "select_k", None)
    try:
        with cpu_threads() if runs_pipeline else contextlib.nullcontext(), _process_group(args):
            return args.handler(args) or 0
    except (ModelNotAvailableError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
