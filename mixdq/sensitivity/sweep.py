"""MixDQ's metric-decoupled sensitivity sweep: quantize one layer at a time, at each candidate bit.

Quality layers are scored by the SQNR (dB) of the UNet output against FP, over the whole batch of
UNet inputs that the FP sampler visits (every prompt, every step). Content layers are scored by the
SSIM of the final decoded images against the FP images made from the same prompts and noise.
SSIM: torchmetrics' implementation, Gaussian window 11×11, σ = 1.5, data range [0, 1], on RGB.

Each evaluation costs one batched UNet forward (quality) or one batched sampling run plus decoding
(content); :class:`SweepStats` reports both in UNet-forward equivalents.

``SweepSettings(metrics="sqnr")`` scores every layer, content layers included, by UNet-output SQNR: the
single-metric baseline of MixDQ's ablation ("mixed precision without metric decoupling") needs those rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm.auto import tqdm

from mixdq.config import ACT_BITS, WEIGHT_BITS
from mixdq.inventory import LayerInfo, inventory_fingerprint, layer_inventory
from mixdq.numerics import fp32_numerics, numerics_settings
from mixdq.quant import quant_layers, quantization_off, quantize_
from mixdq.sensitivity.table import COLUMNS, GROUP_METRIC, validate_table

SSIM_WINDOW = {"kernel_size": 11, "sigma": 1.5, "gaussian_kernel": True, "data_range": 1.0}
# A layer whose quantization changes nothing would score infinite SQNR; tables hold finite numbers.
MAX_SQNR_DB = 200.0
DECOUPLED = "decoupled"
SWEEP_METRICS: tuple[str, ...] = (DECOUPLED, "sqnr")


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep measures with; all of it is part of the cache key."""

    prompts: tuple[str, ...]
    num_inference_steps: int = 1
    seed: int = 42
    height: int = 128
    width: int = 128
    weight_bits: tuple[int, ...] = WEIGHT_BITS
    act_bits: tuple[int, ...] = ACT_BITS
    targets: tuple[str, ...] = ("weight", "act")
    layers: tuple[str, ...] | None = None  # sweep only these layers (default: all)
    metrics: str = DECOUPLED  # DECOUPLED: each group by GROUP_METRIC; "sqnr": every layer by UNet-output SQNR

    def __post_init__(self) -> None:
        if self.metrics not in SWEEP_METRICS:
            raise ValueError(f"sweep metrics {self.metrics!r} is not one of {list(SWEEP_METRICS)}.")

    def metric(self, group: str) -> str:
        """The metric that scores a layer of ``group`` in this sweep."""
        return GROUP_METRIC[group] if self.metrics == DECOUPLED else self.metrics


@dataclass
class SweepStats:
    """Measured cost of the sweep."""

    evaluations: int = 0
    seconds: float = 0.0
    unet_forward_seconds: float = 0.0  # one batched FP UNet forward over the recorded inputs
    seconds_per_eval: dict[str, float] = field(default_factory=dict)  # by metric

    def unet_forward_equivalents(self) -> dict[str, float]:
        """Cost of one layer × bit evaluation, in batched UNet forwards."""
        return {m: s / self.unet_forward_seconds for m, s in self.seconds_per_eval.items()}


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10·log10(Σy² / Σ(y_q − y)²)`` over the whole batch, capped at :data:`MAX_SQNR_DB`."""
    noise = (test.double() - reference.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0.0:
        return MAX_SQNR_DB
    return min(MAX_SQNR_DB, 10.0 * math.log10(signal / noise))


def image_ssims(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, shape (N,), of two (N, 3, H, W) image batches in [0, 1], with :data:`SSIM_WINDOW`.

    The one SSIM of the library: the sweep scores content layers with it and evaluation
    (:func:`mixdq.evaluate.metrics.ssim`) reports it, so both measure the same thing.
    """
    return structural_similarity_index_measure(test.float(), reference.float(), reduction="none", **SSIM_WINDOW)


def image_ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean SSIM of two (N, 3, H, W) image batches in [0, 1] (float rounding can overshoot 1; clipped)."""
    return min(1.0, float(image_ssims(reference, test).mean()))


class _Reference:
    """The FP run everything is compared against: UNet inputs and outputs, and the final images.

    Sampling is a lean copy of the SDXL pipeline's loop (EulerAncestral, guidance 0, fixed prompt
    embeddings and noise): the pipeline's per-call overhead would otherwise dominate each evaluation.
    """

    def __init__(self, pipe, settings: SweepSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        device, dtype = pipe.unet.device, pipe.unet.dtype
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                list(settings.prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        size = (settings.height, settings.width)
        time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        self.cond = {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(embeds), 1)},
        }
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.scheduler.set_timesteps(settings.num_inference_steps, device=device)
        scale = pipe.vae_scale_factor
        shape = (len(embeds), pipe.unet.config.in_channels, settings.height // scale, settings.width // scale)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(settings.seed))
        self.initial_latents = (noise * self.scheduler.init_noise_sigma).to(device, dtype)

        self.unet_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.input_numel: dict[str, int] = {}
        hooks = [pipe.unet.register_forward_pre_hook(self._record, with_kwargs=True)]
        for name, layer in quant_layers(pipe).items():
            hooks.append(layer.register_forward_pre_hook(lambda m, args, name=name: self._record_size(name, args[0])))
        try:
            with quantization_off(pipe):
                self.images = self.generate()
        finally:
            for hook in hooks:
                hook.remove()
        steps = len(self.unet_inputs)
        self.sample = torch.cat([sample for sample, _ in self.unet_inputs])
        self.timestep = torch.cat([t.reshape(-1).expand(len(embeds)) for _, t in self.unet_inputs])
        self.batched_cond = {
            "encoder_hidden_states": embeds.repeat(steps, 1, 1),
            "added_cond_kwargs": {k: v.repeat(steps, 1) for k, v in self.cond["added_cond_kwargs"].items()},
        }
        start = time.perf_counter()
        self.unet_outputs = self.unet_forward()
        self.unet_forward_seconds = time.perf_counter() - start

    def _record(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.unet_inputs.append((sample, torch.as_tensor(timestep, device=sample.device)))

    def _record_size(self, name: str, x: torch.Tensor) -> None:
        self.input_numel.setdefault(name, x.numel() // x.shape[0])

    @torch.no_grad()
    def unet_forward(self) -> torch.Tensor:
        """One batched UNet call over every (prompt, step) input of the FP trajectory."""
        return self.pipe.unet(self.sample, self.timestep, **self.batched_cond, return_dict=False)[0]

    @torch.no_grad()
    def generate(self) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), from the fixed prompts and noise."""
        scheduler = copy.deepcopy(self.scheduler)
        generator = torch.Generator("cpu").manual_seed(self.settings.seed + 1)
        latents = self.initial_latents
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            prediction = self.pipe.unet(model_input, t, **self.cond, return_dict=False)[0]
            latents = scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def sweep_jobs(layers: Sequence[LayerInfo], settings: SweepSettings) -> list[tuple[str, str, int]]:
    """``(layer, target, bit)`` in a fixed order: weight-only sweep first, then activation-only."""
    if settings.layers is not None:
        unknown = sorted(set(settings.layers) - {info.name for info in layers})
        if unknown:
            raise ValueError(f"sweep layers: unknown layer {unknown[0]!r} (not a Linear/Conv2d of this UNet).")
        layers = [info for info in layers if info.name in settings.layers]
    jobs = []
    for target, bits in (("weight", settings.weight_bits), ("act", settings.act_bits)):
        if target in settings.targets:
            jobs += [(info.name, target, bit) for info in layers for bit in bits]
    return jobs


def provenance(pipe, layers: Sequence[LayerInfo], settings: SweepSettings, act_ranges_key: str) -> dict[str, Any]:
    """Everything the table depends on; a cached table is reused only when all of it matches."""
    prompts_hash = hashlib.sha256("\n".join(settings.prompts).encode()).hexdigest()[:16]
    return {
        "model_id": getattr(pipe, "model_id", type(pipe).__name__),
        "fingerprint": inventory_fingerprint(list(layers)),
        "prompts_sha256": prompts_hash,
        "num_prompts": len(settings.prompts),
        **{k: v for k, v in asdict(settings).items() if k != "prompts"},
        "act_ranges": act_ranges_key,
        "quantizer": "weights per-channel symmetric min-max; activations per-tensor asymmetric EMA min-max; BOS-aware",
        "ssim": SSIM_WINDOW,
        "dtype": str(pipe.unet.dtype),
        "numerics": numerics_settings(),  # TF32 or not changes every value (a ~70 dB SQNR floor with it)
    }


def cache_key(prov: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(prov, sort_keys=True, default=str).encode()).hexdigest()[:16]


def table_path(cache_dir: str | Path, prov: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> Path:
    """Where the table of this provenance (and shard) is cached; its ``.json`` sibling holds provenance and stats."""
    index, count = shard
    suffix = "" if count == 1 else f".shard-{index}-of-{count}"
    return Path(cache_dir) / f"sensitivity-{cache_key(prov)}{suffix}.csv"


def read_cached(path: Path) -> tuple[pd.DataFrame, SweepStats] | None:
    """The cached table and stats at ``path``, or ``None`` when not (completely) written."""
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    stats = SweepStats(**json.loads(path.with_suffix(".json").read_text())["stats"])
    return validate_table(pd.read_csv(path)), stats


def write_cached(path: Path, table: pd.DataFrame, prov: dict[str, Any], stats: SweepStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    path.with_suffix(".json").write_text(
        json.dumps({"provenance": prov, "stats": asdict(stats)}, indent=2, default=str)
    )


def cost_stats(spent: Sequence[tuple[str, float]], unet_forward_seconds: float, seconds: float) -> SweepStats:
    """:class:`SweepStats` from ``(metric, seconds)`` per evaluation."""
    by_metric: dict[str, list[float]] = {}
    for metric, tick in spent:
        by_metric.setdefault(metric, []).append(tick)
    return SweepStats(
        evaluations=len(spent),
        seconds=seconds,
        unet_forward_seconds=unet_forward_seconds,
        seconds_per_eval={m: sum(v) / len(v) for m, v in by_metric.items()},
    )


class SweepRun:
    """What every evaluation of one sweep shares: the FP reference run and the wrapped layers.

    Building it quantizes nothing (every layer computes FP with its ranges loaded); :meth:`evaluate` turns one
    layer's bits on, measures, and turns them off again, so evaluations are independent and can run in any
    order or process.
    """

    def __init__(self, pipe, act_ranges, settings: SweepSettings, layers: Sequence[LayerInfo]) -> None:
        quantize_(pipe, None, act_ranges)
        self.settings = settings
        self.reference = _Reference(pipe, settings)
        self.by_name = {info.name: info for info in layers}
        self.modules = quant_layers(pipe)

    def evaluate(self, job: tuple[str, str, int]) -> tuple[tuple, str, float]:
        """The table row of ``job = (layer, target, bit)``, its metric and the seconds it took."""
        name, target, bit = job
        info = self.by_name[name]
        metric = self.settings.metric(info.group)
        layer = self.modules[name]
        tick = time.perf_counter()
        layer.set_bits(bit if target == "weight" else None, bit if target == "act" else None)
        try:
            if metric == "sqnr":
                value = sqnr_db(self.reference.unet_outputs, self.reference.unet_forward())
            else:
                value = image_ssim(self.reference.images, self.reference.generate())
        finally:
            layer.set_bits(None, None)
        size = info.weight_numel if target == "weight" else self.reference.input_numel[name]
        return (
            (name, info.group, info.kind, info.block, size, bit, target, metric, value),
            metric,
            time.perf_counter() - tick,
        )


@fp32_numerics()
def run_sweep(
    pipe,
    act_ranges,
    settings: SweepSettings,
    shard: tuple[int, int] = (0, 1),
    cache_dir: str | Path | None = None,
    progress: bool = True,
    act_ranges_key: str = "",
) -> tuple[pd.DataFrame, SweepStats]:
    """The sensitivity table of ``pipe``'s UNet (this shard's rows), and what it cost.

    ``act_ranges`` come from :func:`mixdq.calibrate.calibrate` (activation sweeps need them).
    It runs in IEEE FP32 (:func:`mixdq.numerics.fp32_numerics`: no TF32), recorded in the provenance.
    With ``cache_dir``, a table with the same provenance is read back instead of recomputed.
    ``shard=(i, n)`` takes every n-th job starting at i; :func:`merge_shards` joins the parts.
    Under ``torchrun``, :func:`mixdq.sensitivity.distributed.run_sweep_distributed` splits the jobs instead.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}.")
    layers = layer_inventory(pipe.unet)
    prov = provenance(pipe, layers, settings, act_ranges_key)
    path = None if cache_dir is None else table_path(cache_dir, prov, shard)
    cached = None if path is None else read_cached(path)
    if cached is not None:
        return cached

    run = SweepRun(pipe, act_ranges, settings, layers)
    jobs = sweep_jobs(layers, settings)[index::count]
    rows, spent = [], []
    started = time.perf_counter()
    for job in tqdm(jobs, desc=f"sensitivity {index + 1}/{count}", disable=not progress, unit="eval"):
        row, metric, seconds = run.evaluate(job)
        rows.append(row)
        spent.append((metric, seconds))
    stats = cost_stats(spent, run.reference.unet_forward_seconds, time.perf_counter() - started)
    table = validate_table(pd.DataFrame(rows, columns=list(COLUMNS)))
    if path is not None:
        write_cached(path, table, prov, stats)
    return table, stats


def merge_shards(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One table from shard tables (validated: a job present twice is an error)."""
    return validate_table(pd.concat(list(tables), ignore_index=True))
