"""The evaluation loop: generate FP and quantized images with identical noise and tabulate quality per config.

One row per config, in the order given. Every config's image *i* comes from prompt *i* and a CPU generator
seeded with ``seeds[i]``, whatever the batching, so any difference from the FP image is quantization error
(the FP images are the reference; a ``None`` config is a row for FP itself: SSIM 1, PSNR inf, FD 0).

Columns (a column is present only when what it needs was given):

* ``config``; ``avg_weight_bits`` (size-weighted over quantizable layers, FP16 = 16); ``weight_mb`` and
  ``weight_ratio`` (UNet weight memory and how many times smaller than FP16, per :mod:`mixdq.memory`);
* ``ssim`` (mean per-image SSIM vs FP), ``psnr_db`` (PSNR of the pooled MSE vs FP; see :func:`metrics.psnr`);
* with a ``scorer``: ``clip_score`` (mean 100 × cosine of image and its prompt) and ``fd`` (Fréchet distance
  between L2-normalised CLIP image embeddings of this config's images and of the FP images);
* with a ``checker`` and ``attributes``: ``alignment`` (share of images the checker accepts, 0..1);
* with ``inception_weights``: ``inception_fid`` vs the FP images;
* ``seconds``: wall time of this config's generation and metrics (calibration excluded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.evaluate.metrics import (
    ClipScorer,
    cosine_score,
    frechet_distance,
    inception_fid_metric,
    psnr_from_mse,
    ssim,
)
from mixdq.inventory import LayerInfo, layer_inventory, non_layer_param_count
from mixdq.memory import FP16_BITS, MB, average_weight_bits, weight_memory
from mixdq.models import sample, seeded_generator
from mixdq.quant import quantization_off, quantize_
from mixdq.quant.ranges import ActivationRanges

# (one generated image (3, H, W) in [0, 1], the ground truth of its prompt) -> does the image show it?
# The embedded model's checker fits as ``lambda image, scene: mixdq.tiny.checker.check(image, scene).correct``.
AlignmentChecker = Callable[[torch.Tensor, Any], bool]

RESULTS_FORMAT = "mixdq-studio/evaluation"


def evaluate(
    pipe,
    configs: Mapping[str, PrecisionConfig | None],
    prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    num_inference_steps: int = 1,
    height: int | None = None,
    width: int | None = None,
    scorer: ClipScorer | None = None,
    checker: AlignmentChecker | None = None,
    attributes: Sequence[Any] | None = None,
    act_ranges: ActivationRanges | None = None,
    calibration_prompts: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    bos_aware: bool | Mapping[str, bool] = True,
) -> pd.DataFrame:
    """Quality and weight memory of each config (``None`` = FP) against the FP images, one row per config.

    ``seeds``: one per prompt, or an int ``s`` giving prompt *i* the seed ``s + i``. Activation ranges: the given
    ``act_ranges`` for every config, else each config that quantizes activations is calibrated with its own weight
    bits (MixDQ: upstream layers quantized) on ``calibration_prompts`` (default: ``assets/prompts.txt``, not the
    evaluation prompts), cached under ``cache_dir``, at the activation bits the config uses. Sampling is guidance 0,
    SDXL-Turbo style.

    ``bos_aware``: MixDQ's BOS handling for every config, or per config name (names left out get ``True``);
    ``{"naive W8A8": False}`` makes the ablation's naive baseline, calibrated the naive way too.

    With a checker and an FP config (``None``) in ``configs``, each quantized row also gets the paired comparison
    with FP: ``aligned_lost`` / ``aligned_gained`` (prompts FP aligns and the config does not, and the reverse)
    and ``alignment_delta_se``, the standard error of the alignment difference over the same prompts (what
    decides whether a gap is noise; the binomial error of one alignment number overstates it).

    Only the FP images (and their features) are kept in memory; each config's images are scored batch by batch.
    The UNet is left wrapped by :func:`mixdq.quant.quantize_` computing exact FP, as calibration leaves it.
    """
    prompts = list(prompts)
    seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    _check_inputs(configs, prompts, seeds, checker, attributes, batch_size)
    bos = _bos_flags(configs, bos_aware)
    fid = inception_fid_metric(inception_weights) if inception_weights is not None else None
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    layers = layer_inventory(pipe.unet)
    other_params = non_layer_param_count(pipe.unet)
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]

    def generate(batch: range) -> torch.Tensor:
        generators = [seeded_generator(seeds[i]) for i in batch]
        prompt = [prompts[i] for i in batch]
        images = sample(
            pipe, prompt, generator=generators, steps=num_inference_steps, height=height, width=width, output_type="pt"
        )
        return images.float().cpu()

    bar = tqdm(total=len(batches) * (len(configs) + 1), desc="evaluate: FP", disable=not progress)
    try:
        with quantization_off(pipe):
            reference = []
            for batch in batches:
                reference.append(generate(batch))
                bar.update(1)
        reference_images = torch.cat(reference)
        text_features = reference_features = None
        if scorer is not None:
            text_features = torch.cat([scorer.encode_texts([prompts[i] for i in batch]) for batch in batches])
            reference_features = torch.cat(
                [_image_features(scorer, reference_images[b.start : b.stop]) for b in batches]
            )
        if fid is not None:
            fid.update(reference_images, real=True)

        rows = []
        aligned_by_config: dict[str, torch.Tensor] = {}  # per-prompt alignment (0/1) of each config
        for name, config in configs.items():
            bar.set_description(f"evaluate: {name}")
            if config is not None:
                ranges = act_ranges
                if ranges is None and config.act_bits:
                    bar.set_description(f"evaluate: {name} (calibrating)")
                    ranges = calibrate(
                        pipe,
                        prompts=list(calibration_prompts) if calibration_prompts is not None else None,
                        num_inference_steps=num_inference_steps,
                        height=height,
                        width=width,
                        act_bits=tuple(sorted(set(config.act_bits.values()))),
                        weight_bits=config,
                        cache_dir=cache_dir,
                        progress=False,
                        bos_aware=bos[name],
                    )
                quantize_(pipe, config, act_ranges=ranges, bos_aware=bos[name])
                bar.set_description(f"evaluate: {name}")
            start = time.perf_counter()
            scores: dict[str, list[torch.Tensor]] = {"ssim": [], "sq_error": [], "features": [], "aligned": []}
            if fid is not None:
                fid.reset()
            for batch in batches:
                images = reference_images[batch.start : batch.stop] if config is None else generate(batch)
                expected = reference_images[batch.start : batch.stop]
                scores["ssim"].append(ssim(expected, images))
                scores["sq_error"].append((images.double() - expected.double()).pow(2).flatten(1).mean(1))
                if scorer is not None:
                    scores["features"].append(_image_features(scorer, images))
                if checker is not None:
                    verdicts = [bool(checker(images[j], attributes[i])) for j, i in enumerate(batch)]
                    scores["aligned"].append(torch.tensor(verdicts, dtype=torch.float64))
                if fid is not None:
                    fid.update(images, real=False)
                bar.update(1)
            rows.append(
                _row(name, config, layers, other_params, scores, text_features, reference_features, fid)
                | {"seconds": time.perf_counter() - start}
            )
            if scores["aligned"]:
                aligned_by_config[name] = torch.cat(scores["aligned"])
    finally:
        bar.close()
        quantize_(pipe, None)
    _add_paired_alignment(rows, aligned_by_config, next((n for n, c in configs.items() if c is None), None))
    table = pd.DataFrame(rows)
    table.attrs = {
        "model_id": str(getattr(pipe, "model_id", type(pipe).__name__)),
        "num_prompts": len(prompts),
        "seeds": seeds,
        "num_inference_steps": num_inference_steps,
        "height": height,
        "width": width,
        "guidance_scale": 0.0,
    }
    return table


def _check_inputs(
    configs: Mapping[str, PrecisionConfig | None],
    prompts: list[str],
    seeds: list[int],
    checker: AlignmentChecker | None,
    attributes: Sequence[Any] | None,
    batch_size: int,
) -> None:
    if not configs:
        raise ValueError("configs is empty; pass e.g. {'FP16': None, 'W8A8': config}.")
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts (a covariance needs 2 samples), got {len(prompts)}.")
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt or an int.")
    if (checker is None) != (attributes is None):
        raise ValueError("alignment needs both a checker and attributes (one per prompt), or neither.")
    if attributes is not None and len(attributes) != len(prompts):
        raise ValueError(f"attributes: {len(attributes)} entries for {len(prompts)} prompts; pass one per prompt.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")


def _bos_flags(configs: Mapping[str, PrecisionConfig | None], bos_aware: bool | Mapping[str, bool]) -> dict[str, bool]:
    """``{config name: bos_aware}`` from one flag for all or a per-name map (missing names: ``True``)."""
    if isinstance(bos_aware, bool):
        return dict.fromkeys(configs, bos_aware)
    unknown = sorted(set(bos_aware) - set(configs))
    if unknown:
        raise ValueError(f"bos_aware: unknown config {unknown[0]!r}; the configs are {list(configs)}.")
    return {name: bool(bos_aware.get(name, True)) for name in configs}


def _image_features(scorer: ClipScorer, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings: FD then compares directions, the quantity the CLIP score uses."""
    return F.normalize(scorer.encode_images(images).double(), dim=-1)


def _row(
    name: str,
    config: PrecisionConfig | None,
    layers: list[LayerInfo],
    other_params: int,
    scores: dict[str, list[torch.Tensor]],
    text_features: torch.Tensor | None,
    reference_features: torch.Tensor | None,
    fid: Any,
) -> dict[str, Any]:
    memory = weight_memory(layers, config, other_params)
    mse = torch.cat(scores["sq_error"]).mean().item()
    row: dict[str, Any] = {
        "config": name,
        "avg_weight_bits": average_weight_bits(layers, config) if config is not None else float(FP16_BITS),
        "weight_mb": memory.total_bytes / MB,
        "weight_ratio": memory.ratio,
        "ssim": torch.cat(scores["ssim"]).mean().item(),
        "psnr_db": psnr_from_mse(mse),
    }
    if text_features is not None:
        features = torch.cat(scores["features"])
        row["clip_score"] = cosine_score(features, text_features).mean().item()
        row["fd"] = frechet_distance(features, reference_features)
    if scores["aligned"]:
        row["alignment"] = torch.cat(scores["aligned"]).mean().item()
    if fid is not None:
        row["inception_fid"] = float(fid.compute())
    return row


def _add_paired_alignment(rows: list[dict[str, Any]], verdicts: dict[str, torch.Tensor], fp_name: str | None) -> None:
    """Per quantized row: prompts lost / gained against the FP row on the same prompts, and the standard error
    of the alignment difference (sample std of the per-prompt differences / sqrt(n))."""
    if fp_name is None or fp_name not in verdicts:
        return
    fp = verdicts[fp_name]
    for row in rows:
        if row["config"] == fp_name or row["config"] not in verdicts:
            continue
        diff = verdicts[row["config"]] - fp
        row["aligned_lost"] = int((diff < 0).sum())
        row["aligned_gained"] = int((diff > 0).sum())
        row["alignment_delta_se"] = float(diff.std(unbiased=True) / len(diff) ** 0.5) if len(diff) > 1 else float("nan")


RESULT_SUFFIXES = (".csv", ".json", ".md")


def results_path(stem: str | Path, suffix: str) -> Path:
    """``stem`` + ``suffix``: a stem may hold dots (``quality_k0.62``), which ``with_suffix`` would cut off;
    a stem that already ends in a results suffix has it replaced."""
    stem = Path(stem)
    if stem.suffix in RESULT_SUFFIXES:
        return stem.with_suffix(suffix)
    return stem.parent / f"{stem.name}{suffix}"


def save_results(table: pd.DataFrame, path_stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (the table) and ``<stem>.json`` (settings from ``table.attrs`` plus the rows) and return
    both paths. Infinite PSNR stays infinite: ``inf`` in the CSV, ``Infinity`` in the JSON (Python's and
    pandas' readers accept both; strict JSON parsers reject ``Infinity``, which is why it is not turned into null).
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = results_path(stem, ".csv"), results_path(stem, ".json")
    table.to_csv(csv_path, index=False)
    document = {"format": RESULTS_FORMAT, "settings": table.attrs, "rows": table.to_dict(orient="records")}
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return csv_path, json_path


def load_results(path: str | Path) -> pd.DataFrame:
    """Read what :func:`save_results` wrote: a ``.json`` (rows and settings in ``attrs``) or a ``.csv`` (rows only)."""
    path = Path(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not an evaluation result written by save_results (format {RESULTS_FORMAT!r}).")
    table = pd.DataFrame(document["rows"])
    table.attrs = document["settings"]
    return table
