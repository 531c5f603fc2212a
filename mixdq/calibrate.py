"""Calibration: run prompts through the pipeline and record every layer's activation range at every
candidate activation bit-width, with upstream layers already quantized at that bit-width (MixDQ's static per-tensor
asymmetric min-max with an EMA). Results are cached on disk keyed by everything that changes them.
Each bit-width's ranges come from its own pass rather than MixDQ's single pass: on mixed A4/A8 configs the
A4 pass's ranges gave the better images (README, "What is sensitive in it").
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mixdq.config import ACT_BITS, PrecisionConfig
from mixdq.distributed import DistContext, current
from mixdq.inventory import LayerInfo, inventory_fingerprint, layer_inventory
from mixdq.models import ASSETS_DIR, TURBO_SAMPLING, sample, seeded_generator
from mixdq.numerics import fp32_numerics, numerics_settings
from mixdq.quant.api import collect_act_ranges, quant_layers, quantize_, set_mode
from mixdq.quant.layers import QuantMode
from mixdq.quant.primitives import EMA_MOMENTUM
from mixdq.quant.ranges import ActivationRanges, manifest, read_manifest

logger = logging.getLogger(__name__)

PROMPTS_FILE = ASSETS_DIR / "prompts.txt"
# Used only when assets/prompts.txt is missing; captions in the style of the embedded model's data.
FALLBACK_PROMPTS: tuple[str, ...] = (
    "a red circle above a blue square on a yellow background",
    "a green triangle left of a purple circle on a white background",
    "a small orange square below a large cyan triangle on a black background",
    "a blue circle right of a red triangle on a gray background",
    "a yellow square above a green circle on a blue background",
    "a white triangle below a magenta square on a green background",
    "a large purple circle on an orange background",
    "a cyan square left of a yellow triangle on a red background",
)
# Describes the quantizer whose ranges are cached; change it whenever the quantizer's math changes.
# ``bos_aware_text_embedding`` is the default; calibrate(bos_aware=False) records False instead.
QUANTIZER_SETTINGS: dict[str, Any] = {
    "activations": "static per-tensor asymmetric min-max, range contains 0",
    "ema_momentum": EMA_MOMENTUM,
    "bos_aware_text_embedding": True,
    "concat_split_shortcut": True,
    "upstream_quantized": True,
}


def default_prompts() -> list[str]:
    """The calibration prompts shipped in ``assets/prompts.txt`` (one per line), else a built-in fallback."""
    if PROMPTS_FILE.is_file():
        prompts = [line.strip() for line in PROMPTS_FILE.read_text().splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if prompts:
            return prompts
    logger.warning(
        "%s not found or empty; calibrating on %d built-in shape captions.", PROMPTS_FILE, len(FALLBACK_PROMPTS)
    )
    return list(FALLBACK_PROMPTS)


@fp32_numerics()
def calibrate(
    pipe,
    prompts: list[str] | None = None,
    num_inference_steps: int = TURBO_SAMPLING.num_inference_steps,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    act_bits: tuple[int, ...] = ACT_BITS,
    weight_bits: int | PrecisionConfig | None = 8,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    bos_aware: bool = True,
) -> ActivationRanges:
    """Activation ranges of every UNet layer at every bit in ``act_bits``.

    One pass over the prompts per activation bit-width, with every layer's inputs at that bit-width and
    weights at ``weight_bits`` (an int for all layers, a config for per-layer bits, ``None`` for FP), each
    layer observing its input (EMA, momentum 0.95) and then quantizing it with the updated range, so
    downstream layers see upstream quantization error as they will at inference. Sampling is guidance 0
    (SDXL-Turbo style); each pass uses the same seeded noise. It runs in IEEE FP32 (no TF32, see
    :func:`mixdq.numerics.fp32_numerics`), and the provenance records the settings.

    With ``cache_dir`` a result made with the same model, prompts, steps, seed, resolution, batch size,
    bits and quantizer is loaded instead of recomputed. Either way the UNet is left wrapped with the
    ranges loaded and computing exact FP (no layer quantized): apply a config with ``quantize_(unet, config)``.

    ``bos_aware=False`` calibrates the naive baseline: the BOS token (token 0 of the text embedding) counts in
    the ``attn2.to_k`` / ``to_v`` ranges, as in plain min-max quantization. The flag is part of the cache key,
    and ``quantize_`` refuses ranges made under the other setting.

    Inside a process group (:func:`mixdq.distributed.process_group`, e.g. under ``torchrun``) every rank must
    call it alike; the passes are split by activation bit-width and the ranges gathered, so every rank gets
    exactly the single-process ranges (:func:`gather_ranges` says why not by batch).
    """
    unet = pipe.unet
    layers = layer_inventory(unet)
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts:
        raise ValueError("calibrate needs at least one prompt.")
    for bits in act_bits:
        if bits not in ACT_BITS:
            raise ValueError(f"act_bits: {bits!r} not allowed; choose from {list(ACT_BITS)}.")
    if isinstance(weight_bits, PrecisionConfig):
        weight_bits.validate(layers)
        weight_config = weight_bits
    else:
        weight_config = PrecisionConfig.uniform(layers, weight_bits, None)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor

    provenance = {
        "model_id": str(getattr(pipe, "model_id", type(unet).__name__)),
        "fingerprint": inventory_fingerprint(layers),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "num_prompts": len(prompts),
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "height": height,
        "width": width,
        "batch_size": batch_size,
        "act_bits": sorted(act_bits),
        "weight_bits": _weight_spec(weight_bits),
        "quantizer": QUANTIZER_SETTINGS | {"bos_aware_text_embedding": bos_aware},
        "numerics": numerics_settings(),
    }
    cache_path = _cache_path(cache_dir, provenance) if cache_dir is not None else None
    if cache_path is not None and read_manifest(cache_path) == manifest(provenance):
        result = ActivationRanges.load(cache_path)
        quantize_(unet, None, act_ranges=result, bos_aware=bos_aware)
        logger.info("loaded activation ranges from %s", cache_path)
        return result

    ctx = current()
    own_bits = tuple(act_bits)[ctx.rank :: ctx.world_size]  # each pass is independent of the others
    quantize_(unet, None, bos_aware=bos_aware)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=len(own_bits) * len(batches), desc="calibrating", disable=not (progress and ctx.is_main))
    try:
        for bits in own_bits:
            for name, layer in quant_layers(unet).items():
                layer.set_act_range(bits, None)
                layer.weight_bits = weight_config.layer_weight_bits(name)
                layer.fp8 = weight_config.layer_fp8(name)  # upstream layers on the grid they will run
                layer.weight_clip = weight_config.weight_clip
                layer.act_bits = bits
            set_mode(unet, QuantMode.CALIBRATE)
            generator = seeded_generator(seed)
            for batch in batches:
                sample(
                    pipe,
                    batch,
                    generator=generator,
                    steps=num_inference_steps,
                    height=height,
                    width=width,
                    output_type="latent",
                )
                bar.update(1)
    finally:
        bar.close()
        quantize_(unet, None, bos_aware=bos_aware)
    ranges = {bits: by_layer for bits, by_layer in collect_act_ranges(unet).items() if bits in own_bits}
    if ctx.distributed:
        ranges = gather_ranges(ranges, tuple(act_bits), layers, ctx)
    result = ActivationRanges(ranges=ranges, provenance=provenance)
    if ctx.distributed:
        quantize_(unet, None, act_ranges=result, bos_aware=bos_aware)  # the other ranks' bit-widths too
    if cache_path is not None and ctx.is_main:
        result.save(cache_path)
    ctx.barrier()  # the cache is complete before any rank reads it
    return result


def gather_ranges(
    own: dict[int, dict[str, torch.Tensor]], act_bits: tuple[int, ...], layers: list[LayerInfo], ctx: DistContext
) -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's ranges on every rank: a min / max all-reduce, each bit-width's ranges made by one rank.

    A rank fills the bit-widths it did not calibrate with the neutral ``(+inf, -inf)``, so the reduction
    returns the owner's values bit for bit. Why split by bit-width and not by batch: the EMA is sequential
    (every batch's update depends on the range after the previous batch, and quantizes with it before the
    next layer runs), so batches on different ranks would need a collective per layer call, and even then
    float results change with the batch size a rank computes. Bit-width passes share nothing, so this split
    is exact; it uses at most ``len(act_bits)`` ranks (the sweep, the costly step, uses all of them).
    """
    parts = {info.name: 1 if info.concat_split is None else 2 for info in layers}
    slots = [(bits, name) for bits in act_bits for name in parts]
    neutral = {name: torch.tensor([[float("inf"), float("-inf")]] * n) for name, n in parts.items()}
    stacked = torch.cat([own.get(bits, {}).get(name, neutral[name]) for bits, name in slots]).to(torch.float64)
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
    lows, highs = stacked[:, 0].contiguous().to(device), stacked[:, 1].contiguous().to(device)
    dist.all_reduce(lows, op=dist.ReduceOp.MIN)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX)
    gathered = torch.stack([lows, highs], dim=1).cpu().to(torch.float32).split([parts[n] for _, n in slots])
    result: dict[int, dict[str, torch.Tensor]] = {}
    for (bits, name), r in zip(slots, gathered, strict=True):
        if bool(torch.isfinite(r).all()):  # a layer the pass never reached stays missing, as in one process
            result.setdefault(bits, {})[name] = r.contiguous()
    return result


def _weight_spec(weight_bits: int | PrecisionConfig | None) -> str:
    """A short, stable description of the weight precision used while calibrating."""
    if isinstance(weight_bits, PrecisionConfig):
        spec = {"weight_bits": weight_bits.weight_bits, "protected": sorted(weight_bits.protected)}
        if weight_bits.fp8:  # only when set, so the cache keys of int8-only configs stay what they were
            spec["fp8"] = sorted(weight_bits.fp8)
        if weight_bits.weight_clip != "minmax":
            spec["weight_clip"] = weight_bits.weight_clip
        data = json.dumps(spec, sort_keys=True)
        return "config:" + hashlib.sha256(data.encode()).hexdigest()[:16]
    return "fp" if weight_bits is None else f"W{weight_bits}"


def _cache_path(cache_dir: str | Path, provenance: dict[str, Any]) -> Path:
    """One folder per calibration setting, named from a hash of the provenance."""
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"calib-{key}"
