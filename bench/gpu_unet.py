"""One SDXL UNet denoising step: FP16 (eager, torch.compile) vs our packed-integer UNets vs torchao, side by side.

Why one script, one run: GPU timings move between runs and between an H100 and an H200, so every ratio
reported here is against baselines measured in the same process on the same card (ENV-NOTES.md section 7).

GPU machine (torch 2.11 + triton 3.6 there, no diffusers: it travels as a wheel in the ignored ``.whl/``
folder, named in the device tool's ``carry``), one call, writes ``$OUT/gpu_unet.json`` and ``$OUT/gpu_unet.md``
after every row, so a killed call keeps what it measured::

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null && \\
    PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_unet.py --out $OUT --px 1024 512

A cold machine spends ~2 min per resolution compiling the FP16 baseline (never max-autotune) and about as
long for each of our compiled variants; if the 10-minute call is too short, split it (the baseline is in
every call, so every ratio is same-run)::

    ... bench/gpu_unet.py --out $OUT --px 1024 --variants fp16_compiled,w8a8_compiled,w4a8_compiled
    ... bench/gpu_unet.py --out $OUT --px 1024 --variants fp16_compiled,w4a16_compiled,fp16_eager,w8a8,w4a8

Our kernels pick their tiles by a rule (``kernels/tiles.py``) instead of autotuning: a cold autotune of every
GEMM shape took minutes on the H200. ``MIXDQ_TRITON_AUTOTUNE=1`` restores it.

(device tool: ``carry: [".whl"]``; ``bench/configs/`` is tracked-or-untracked, not ignored, so it travels.)

CPU smoke run (tests/test_bench_gpu_unet.py does the same in-process): ``OMP_NUM_THREADS=1 python
bench/gpu_unet.py --tiny --device cpu --px 64 --variants fp16_eager,w8a8,w4a16 --warmup 1 --repeats 3
--out /tmp/gpu_unet`` (~10 s).

What is measured
* UNet: the full SDXL(-Turbo) architecture from ``assets/sdxl-turbo/unet_config.json`` (2,567M params,
  743 Linear + 51 Conv2d) with random weights (speed and memory do not depend on their values), float16 on
  CUDA, batch 1, one step at t = 999, guidance-free inputs: latent ``(1, 4, px/8, px/8)``, text embedding
  ``(1, 77, 2048)``, ``text_embeds (1, 1280)``, ``time_ids (1, 6)``. ``--tiny`` uses the embedded model's small
  UNet config instead (float32 on CPU). Every variant is built from one FP16 state dict held on the host,
  and freed before the next is built.
* Variants (``--variants``; default order = importance, so a call cut short still has the key rows):
  ``fp16_compiled`` torch.compile, mode default, compiled per resolution (``dynamic=False``: a shape change
  with dynamic shapes took 383 s); ``w8a8`` ours, every layer W8A8; ``w4a8`` ours, the MixDQ allocation at
  ~4.0 average weight bits / 8.0 activation bits from the published SDXL-Turbo sensitivities (precomputed,
  because the allocator imports PuLP, which the GPU machine lacks; see ``bench/configs/``); ``w4a16`` ours,
  every layer weight-only int4; ``fp16_eager``; ``torchao`` int8 dynamic-activation / int8-weight, compiled,
  time-embedding linears skipped (``torch._int_mm`` needs M > 16) -- reported "not installed" without torchao.
  ``*_compiled``: ours under torch.compile (first in the default order: the baseline that counts is compiled
  FP16), which fuses the attention/norm/elementwise part (~42% of the compiled step) as the FP16 baseline
  does; our GEMMs are ``torch.library`` custom ops (``kernels/ops.py``), so the UNet compiles as one graph,
  and A8 inputs are quantized by graph ops that Inductor fuses into the producing op. Convs in the plain
  names run our integer GEMM (``deploy(conv_path="gemm")``, as measured in sessions 2-3); ``_dqconv``: the
  convs unpack their packed weight per call for cuDNN (``conv_path="dequant"``, deploy's default since it
  measured faster); ``_fp8``: the config's W8A8 linears in FP8 e4m3 on cuBLAS (``with_fp8_linears``);
  ``_fp8all``: every A8 linear in FP8 (``with_fp8_linears(low_bit=True)``: 4/2-bit codes unpacked to e4m3);
  ``_dqlow`` / ``_dqlin``: 4/2-bit (all) integer linears dequantized per call for cuBLAS; ``_qkv``: q / k / v
  fused (``mixdq.deploy.fuse``); ``_grp`` (with ``_fp8all``, ``_dqlow`` or ``_dqlin``): each transformer block's 4/2-bit
  linears that unpack per call (FP8 codes; dequant) unpacked in one launch per kind (``mixdq.deploy.unpack_groups``); ``_regional`` / ``_stages``: ``mixdq.deploy.compile.compile_repeated_blocks`` regions.
  ``--rewarm``: compiled rows also time a second warm-up after ``torch._dynamo.reset()`` (warm caches).
* Ours = ``mixdq.deploy``: ``quantize_`` with activation ranges from a short ``QuantMode.CALIBRATE`` pass on
  random inputs, one fake-quant forward per resolution (fills the BOS token-0 cache of the cross-attention
  ``to_k`` / ``to_v``, which a bare UNet needs before deploy, and gives the fake-quant output the deployed
  one is checked against), then ``deploy``: packed int8/int4/int2 layers on the Triton kernels.
* Time: after warm-up (compile, JIT, autotune), one step is captured in a CUDA graph and replayed
  ``--repeats`` times, each replay timed with CUDA events; the median is reported (GPU time, not Python
  launch time). A step that cannot be captured is timed as CUDA-event-timed runs of back-to-back calls
  instead; the ``method`` column says which. On CPU: ``time.perf_counter`` per call.
* Memory (CUDA): static = ``memory_allocated`` after building minus before; peak = ``max_memory_allocated``
  over capture and replays (stats reset after warm-up, per variant and resolution). For our variants also the
  exact bytes from the ``DeployReport``. MB = 1e6 bytes.
* Numerics: relative L2 error of each variant's output against the FP16 eager output, and for ours against
  its own fake-quant model (the deploy numerics contract, on every layer shape of the full UNet).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixdq.config import PrecisionConfig
from mixdq.deploy import DeployReport, deploy
from mixdq.deploy.compile import STAGES, compile_repeated_blocks
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.deploy.unpack_groups import group_unpacking
from mixdq.inventory import layer_inventory
from mixdq.memory import MB
from mixdq.quant import QuantMode, collect_act_ranges, quant_layers, quantize_, set_mode

FULL_UNET_CONFIG = ROOT / "assets" / "sdxl-turbo" / "unet_config.json"
TINY_UNET_CONFIG = ROOT / "assets" / "tiny-sdxl" / "unet" / "config.json"
# Made on a machine with PuLP (the allocator imports it), with the project's own CLI:
#   python -m mixdq allocate --budget-bits 4.0 --act-bits 8 --solver approx --out bench/configs/sdxl_turbo_w4a8.json
#   python -m mixdq allocate --source assets/tiny-sdxl/sensitivity.csv --unet-config assets/tiny-sdxl \
#       --budget-bits 4.0 --act-bits 8 --solver approx --out bench/configs/tiny_w4a8.json
FULL_MIXED_CONFIG = ROOT / "bench" / "configs" / "sdxl_turbo_w4a8.json"
TINY_MIXED_CONFIG = ROOT / "bench" / "configs" / "tiny_w4a8.json"

TEXT_TOKENS = 77
TIMESTEP = 999.0  # SDXL-Turbo's single step
SEED = 0
CALIBRATION_BATCHES = 2  # random latents per activation bit-width; ranges only need to be plausible for timing
BACK_TO_BACK = 5  # calls per CUDA-event sample when a step cannot be captured in a CUDA graph

# A variant of ours is named <config>[_<option>...][_<compile>], e.g. "w4a8_fp8_dqconv_dqlow_regional":
OUR_CONFIGS = {"w8a8": "W8A8 (uniform)", "w4a8": "MixDQ mixed ~W4A8", "w4a16": "W4A16 (uniform, weight-only)"}
OPTIONS = {
    "fp8": "8-bit linears FP8 e4m3 (cuBLAS)",
    "fp8all": "every A8 linear FP8 e4m3 (4/2-bit codes unpacked to e4m3, row-wise cuBLAS)",
    "dqconv": "convs dequant + cuDNN",
    "dqlow": "4/2-bit linears dequant + cuBLAS",
    "dqlin": "all integer linears dequant + cuBLAS",
    "qkv": "q/k/v (cross-attention k/v) fused",
    "grp": "a block's unpacking 4/2-bit linears unpacked in one launch",
    "fast": "FP8 GEMMs with cuBLAS fast accumulation",
}
EXCLUSIVE = ({"fp8", "fp8all"}, {"dqlow", "dqlin"})  # option pairs that contradict each other
REQUIRES = {
    "grp": ("fp8all", "dqlow", "dqlin"),
    "fast": ("fp8", "fp8all"),
}  # an option that means nothing without one of these
COMPILE_MODES = {
    "compiled": "torch.compile",
    "regional": "torch.compile per repeated block",
    "stages": "torch.compile per transformer / resnet / sampler",
}
PEERS = {
    "fp16_compiled": "FP16 torch.compile (mode default)",
    "fp16_regional": "FP16 torch.compile per repeated block",
    "fp16_stages": "FP16 torch.compile per transformer / resnet / sampler",
    "fp16_eager": "FP16 eager",
    "torchao": "torchao int8 dyn-act/int8-weight, compiled",
}


@dataclass(frozen=True)
class VariantSpec:
    """One of our variants, parsed from its name (see :func:`parse_variant`)."""

    config: str
    options: frozenset[str]
    compile: str | None  # None (eager), "compiled" (whole UNet) or "regional" (repeated blocks)

    @property
    def label(self) -> str:
        parts = [f"ours {OUR_CONFIGS[self.config]}", *(OPTIONS[o] for o in OPTIONS if o in self.options)]
        return ", ".join(parts) + (f" + {COMPILE_MODES[self.compile]}" if self.compile else "")


def parse_variant(name: str) -> VariantSpec | None:
    """``VariantSpec`` of one of ours; None for a peer (``PEERS``); ``ValueError`` for an unknown name."""
    if name in PEERS:
        return None
    config, *rest = name.split("_")
    compile_mode = rest.pop() if rest and rest[-1] in COMPILE_MODES else None
    unknown = [o for o in rest if o not in OPTIONS]
    contradictory = any(pair <= set(rest) for pair in EXCLUSIVE)
    incomplete = any(option in rest and not set(needed) & set(rest) for option, needed in REQUIRES.items())
    if config not in OUR_CONFIGS or unknown or len(set(rest)) != len(rest) or contradictory or incomplete:
        raise ValueError(
            f"unknown variant {name!r}: one of {list(PEERS)}, or <config>[_<option>...][_<compile>] with config "
            f"in {list(OUR_CONFIGS)}, options in {list(OPTIONS)} (fp8 or fp8all, dqlow or dqlin; grp needs "
            f"fp8all, dqlow or dqlin; fast needs fp8 or fp8all), compile in {list(COMPILE_MODES)}"
        )
    return VariantSpec(config, frozenset(rest), compile_mode)


def variant_label(name: str) -> str:
    spec = parse_variant(name)
    return PEERS[name] if spec is None else spec.label


DEFAULT_VARIANTS = (
    "fp16_compiled", "w8a8_fp8_dqconv_qkv_compiled", "w8a8_fp8_dqconv_qkv_fast_compiled",
    "w4a8_fp8all_dqconv_qkv_grp_compiled", "w4a8_fp8all_dqconv_qkv_grp_fast_compiled",
    "w4a16_dqconv_dqlin_qkv_compiled", "w4a16_dqconv_dqlin_qkv_grp_compiled", "fp16_regional", "w8a8_fp8_dqconv_qkv_regional",
    "w4a8_fp8all_dqconv_qkv_grp_regional", "w4a16_dqconv_dqlin_qkv_regional", "w8a8_dqconv_compiled",
    "w4a8_dqconv_compiled", "fp16_eager", "w8a8", "w4a8", "w4a16", "torchao",
)  # fmt: skip
BASELINES = {"vs_fp16_compiled": "fp16_compiled", "vs_fp16_regional": "fp16_regional", "vs_fp16_eager": "fp16_eager"}


@dataclass
class Setup:
    """Everything the variants share: the host copy of the weights, the inputs, ranges and references."""

    unet_config: dict[str, Any]
    state: dict[str, torch.Tensor]  # the one FP16 (CPU run: float32) state dict, on the host
    device: torch.device
    dtype: torch.dtype
    text: dict[str, torch.Tensor]  # encoder_hidden_states / text_embeds, the same at every resolution
    px: list[int]
    mixed_config: PrecisionConfig | None
    act_ranges: dict[int, dict[str, torch.Tensor]] | None = None
    reference: dict[int, torch.Tensor] | None = None  # px -> FP16 eager output (float32, host)
    profile: int = 0  # > 0: add a per-kernel-category GPU time breakdown and the top `profile` kernels to CUDA rows
    rewarm: bool = False  # compiled rows: also time a second warm-up after torch._dynamo.reset() (warm caches)


@dataclass
class Built:
    """A variant ready to time: the callable module, and for ours the deploy report and fake-quant outputs."""

    module: nn.Module
    report: DeployReport | None = None
    fake_quant: dict[int, torch.Tensor] | None = None  # px -> the fake-quant model's output (float32, host)


@dataclass
class Timing:
    method: str
    samples_ms: list[float]
    output: torch.Tensor
    warmup_s: float
    peak_bytes: int | None


# ---- model and inputs ---------------------------------------------------------------------------
def random_state_dict(unet_config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers' default random init, made on ``device`` (fast on a GPU), kept on the host in ``dtype``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
    return {name: t.to("cpu", dtype) for name, t in unet.state_dict().items()}


def build_unet(setup: Setup) -> nn.Module:
    """A fresh UNet on the device holding its own copy of the shared weights.

    Built on ``meta`` (no random init to pay for again) and given the copies by ``assign``; the SDXL UNet has
    no non-persistent buffers, which would stay on ``meta`` (checked).
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(setup.unet_config)
    weights = {name: t.to(setup.device, copy=True) for name, t in setup.state.items()}
    unet.load_state_dict(weights, assign=True)
    left = [name for name, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not in the state dict stayed on meta: {left[:3]}")
    return unet.eval().requires_grad_(False)


def text_inputs(unet_config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random text conditioning, drawn once: token 0 must be the vector the BOS cache was filled with."""
    generator = torch.Generator().manual_seed(SEED)
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    hidden = torch.randn(1, TEXT_TOKENS, unet_config["cross_attention_dim"], generator=generator)
    text_embeds = torch.randn(1, pooled, generator=generator)
    return {"encoder_hidden_states": hidden.to(device, dtype), "text_embeds": text_embeds.to(device, dtype)}


def unet_inputs(setup: Setup, px: int, seed: int = SEED) -> dict[str, Any]:
    """Keyword arguments of one guidance-free UNet call at ``px`` pixels (latent ``px / 8``)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, setup.unet_config["in_channels"], px // 8, px // 8, generator=generator)
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)
    return {
        "sample": latent.to(setup.device, setup.dtype),
        "timestep": torch.full((1,), TIMESTEP, device=setup.device),
        "encoder_hidden_states": setup.text["encoder_hidden_states"],
        "added_cond_kwargs": {
            "text_embeds": setup.text["text_embeds"],
            "time_ids": time_ids.to(setup.device, setup.dtype),
        },
        "return_dict": False,
    }


def step(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return module(**inputs)[0]


def host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    """‖out − ref‖ / ‖ref‖ over the whole latent; ``None`` when either is not finite."""
    out = host_copy(out)
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return None
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- calibration (shared by our variants) --------------------------------------------------------
def act_bits_needed(variants: list[str], mixed_config: PrecisionConfig | None) -> set[int]:
    bits: set[int] = set()
    if any(v.startswith("w8a8") for v in variants):
        bits.add(8)
    if mixed_config is not None and any(v.startswith("w4a8") for v in variants):
        bits.update(mixed_config.act_bits.values())
    return bits


def calibrate_and_reference(setup: Setup, act_bits: set[int]) -> None:
    """FP16 eager outputs at every resolution, then activation ranges at each needed bit-width.

    Same procedure as :func:`mixdq.calibrate.calibrate` (weights at 8 bits, each layer observes its input with
    the EMA and quantizes with the updated range), but on random latents and the fixed random text embedding:
    the bench has no pipeline, and the ranges only have to be plausible for timing. The smallest resolution
    is enough: ranges do not change what the kernels cost.
    """
    unet = build_unet(setup)
    quantize_(unet, None)  # wrapped, every layer computing its exact FP output
    setup.reference = {px: host_copy(step(unet, unet_inputs(setup, px))) for px in setup.px}
    for bits in sorted(act_bits):
        for layer in quant_layers(unet).values():
            layer.set_act_range(bits, None)
            layer.weight_bits = 8
            layer.act_bits = bits
        set_mode(unet, QuantMode.CALIBRATE)
        for batch in range(CALIBRATION_BATCHES):
            step(unet, unet_inputs(setup, min(setup.px), seed=SEED + 1 + batch))
    setup.act_ranges = {bits: ranges for bits, ranges in collect_act_ranges(unet).items() if bits in act_bits}


# ---- variants ---------------------------------------------------------------------------------------
def build_ours(
    setup: Setup,
    make_config: Callable[[nn.Module], PrecisionConfig],
    conv_path: str = "gemm",
    linear_path: str | dict[int, str] = "gemm",
    fp8_fast_accum: bool = False,
) -> Built:
    """quantize_ -> one fake-quant forward per resolution (BOS cache, reference) -> deploy."""
    unet = build_unet(setup)
    quantize_(unet, make_config(unet), setup.act_ranges)
    fake_quant = {px: host_copy(step(unet, unet_inputs(setup, px))) for px in setup.px}
    report = deploy(unet, conv_path=conv_path, linear_path=linear_path, fp8_fast_accum=fp8_fast_accum)
    return Built(unet, report, fake_quant)


def uniform(weight_bits: int, act_bits: int | None) -> Callable[[nn.Module], PrecisionConfig]:
    return lambda unet: PrecisionConfig.uniform(layer_inventory(unet), weight_bits, act_bits)


def fp8(
    make_config: Callable[[nn.Module], PrecisionConfig], low_bit: bool = False
) -> Callable[[nn.Module], PrecisionConfig]:
    """The same config with its W8A8 linear layers (``low_bit``: every A8 linear layer) in FP8 e4m3."""
    return lambda unet: make_config(unet).with_fp8_linears(layer_inventory(unet), low_bit=low_bit)


def mixed(setup: Setup) -> Callable[[nn.Module], PrecisionConfig]:
    if setup.mixed_config is None:
        raise ValueError("no mixed-precision config loaded (--mixed-config)")
    return lambda unet: setup.mixed_config


def compiled(built: Built, mode: str = "compiled") -> Built:
    """``torch.compile`` in the default mode with static shapes (each resolution compiles once): the whole UNet,
    or (``mode="regional"``) each repeated block (:func:`mixdq.deploy.compile.compile_repeated_blocks`)."""
    if mode == "regional":
        compile_repeated_blocks(built.module, dynamic=False)
    elif mode == "stages":
        compile_repeated_blocks(built.module, STAGES, dynamic=False)
    else:
        built.module = torch.compile(built.module, dynamic=False)
    return built


def torchao_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's int8 path only where ``torch._int_mm`` accepts the shape (M > 16): not the time-embedding
    linears (``time_embedding.*``, every resnet's ``time_emb_proj``, ``add_embedding.*``), which see M = 1."""
    return isinstance(module, nn.Linear) and "time_emb" not in fqn and not fqn.startswith("add_embedding")


def build_torchao(setup: Setup) -> Built:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    unet = build_unet(setup)
    torchao_quantize_(unet, Int8DynamicActivationInt8WeightConfig(), filter_fn=torchao_filter)
    return compiled(Built(unet))


def build_spec(spec: VariantSpec, setup: Setup) -> Built:
    """One of ours: the config, its options (FP8 linears, dequant paths), then the compile mode."""
    configs = {"w8a8": lambda: uniform(8, 8), "w4a8": lambda: mixed(setup), "w4a16": lambda: uniform(4, None)}
    make_config = configs[spec.config]()
    if "fp8" in spec.options or "fp8all" in spec.options:
        make_config = fp8(make_config, low_bit="fp8all" in spec.options)
    conv_path = "dequant" if "dqconv" in spec.options else "gemm"
    linear_path: str | dict[int, str] = "gemm"
    if "dqlin" in spec.options:
        linear_path = "dequant"
    elif "dqlow" in spec.options:
        linear_path = {4: "dequant", 2: "dequant"}
    built = build_ours(setup, make_config, conv_path, linear_path, "fast" in spec.options)
    if "qkv" in spec.options:
        fuse_qkv_projections(built.module)
    if "grp" in spec.options:
        group_unpacking(built.module)
    return compiled(built, spec.compile) if spec.compile else built


def build_variant(name: str, setup: Setup) -> Built:
    spec = parse_variant(name)
    if spec is not None:
        return build_spec(spec, setup)
    builders: dict[str, Callable[[], Built]] = {
        "fp16_compiled": lambda: compiled(Built(build_unet(setup))),
        "fp16_regional": lambda: compiled(Built(build_unet(setup)), "regional"),
        "fp16_stages": lambda: compiled(Built(build_unet(setup)), "stages"),
        "fp16_eager": lambda: Built(build_unet(setup)),
        "torchao": lambda: build_torchao(setup),
    }
    return builders[name]()


# ---- timing ---------------------------------------------------------------------------------------
def time_cuda(call: Callable[[], torch.Tensor], warmup: int, repeats: int) -> Timing:
    """Median GPU time of one step: CUDA-graph replays, or back-to-back calls where capture fails."""
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    # one call on a side stream, as the torch.cuda.graph docs recommend: lazily created per-stream state (e.g.
    # cuBLAS workspaces) must exist before the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = call()
        method, run, calls = "cuda_graph", graph.replay, 1
    except Exception as err:  # noqa: BLE001 (a sync inside the step: time it uncaptured instead, and say so)
        torch.cuda.synchronize()
        print(f"  CUDA graph capture failed ({type(err).__name__}: {str(err)[:200]}); timing back-to-back calls")
        output = call()
        method, run, calls = "events_back_to_back", call, BACK_TO_BACK
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        begin.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / calls)
    return Timing(method, samples, output.clone(), warmup_s, torch.cuda.max_memory_allocated())


def time_cpu(call: Callable[[], torch.Tensor], warmup: int, repeats: int) -> Timing:
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    warmup_s = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = call()
        samples.append((time.perf_counter() - start) * 1000)
    return Timing("perf_counter", samples, output, warmup_s, None)


# ---- where the time goes ------------------------------------------------------------------------------
KERNEL_CATEGORIES = (  # first match wins; names as the CUDA profiler reports them
    ("ours: A8 GEMM", ("gemm_a8_kernel",)),
    ("ours: weight-only GEMM", ("gemm_a16_kernel",)),
    ("ours: activation quantization", ("act_quant_kernel",)),
    ("ours: weight unpacking", ("unpack_",)),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("cuBLAS FP8 GEMM", ("e4m3", "fp8", "f8f8", "nvjet_qq")),
    # Inductor names a fused kernel after its ops: these produce our GEMMs' int8 inputs (quantize, im2col)
    ("Inductor: quantize / im2col for our GEMMs", ("gemm_a8",)),
    ("Inductor fused kernels", ("triton_",)),
    ("convolution (cuDNN)", ("fprop", "conv", "cudnn", "implicit")),
    ("cuBLAS / CUTLASS GEMM", ("gemm", "xmma", "cutlass", "sm90_", "ampere_", "cublas", "nvjet")),
    ("BOS K/V cache check", ("cdist",)),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def kernel_profile(call: Callable[[], torch.Tensor], steps: int = 3, top: int = 15) -> dict[str, Any]:
    """GPU time per step by kernel category and the ``top`` kernels, from ``steps`` uncaptured calls.

    Uncaptured, so launch gaps do not show here (the timed rows use CUDA graphs); device time only.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    kernels_ms: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us > 0:
            kernels_ms[event.key] += device_us / 1000 / steps
            calls[event.key] += event.count // steps
    by_category: Counter[str] = Counter()
    for name, ms in kernels_ms.items():
        by_category[kernel_category(name)] += ms
    return {
        "ms_per_step": sum(kernels_ms.values()),
        "by_category_ms": dict(by_category.most_common()),
        "top_kernels": [
            {"name": name[:120], "ms": ms, "calls": calls[name]} for name, ms in kernels_ms.most_common(top)
        ],
    }


# ---- one variant, all resolutions -------------------------------------------------------------------
def free_device_memory(device: torch.device) -> int | None:
    """Drop what the previous variant left behind; the bytes still allocated (CUDA) after that."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def deploy_summary(report: DeployReport) -> dict[str, Any]:
    return {
        "weight_mb": report.weight_bytes / MB,
        "accounted_mb": report.accounted_bytes / MB,
        "fp16_mb": report.fp16_bytes / MB,
        "ratio": report.ratio,
        "kernel_backend": report.kernel_backend,
        "precisions": dict(Counter(layer.precision for layer in report.layers).most_common()),
        "describe": report.describe(),
    }


def bench_variant(name: str, setup: Setup, warmup: int, repeats: int, on_row: Callable[[dict[str, Any]], None]) -> None:
    """Build ``name`` once, time it at every resolution, report each row as it is done, free it."""
    base = {"variant": name, "label": variant_label(name)}
    if name == "torchao" and importlib.util.find_spec("torchao") is None:
        for px in setup.px:
            on_row(base | {"px": px, "status": "not installed", "error": "torchao is not installed on this machine"})
        return
    before = free_device_memory(setup.device)
    start = time.perf_counter()
    try:
        built = build_variant(name, setup)
    except Exception as err:  # noqa: BLE001 (a variant that cannot be built must not cost the others)
        for px in setup.px:
            on_row(base | {"px": px, "status": "error", "error": failure(err)})
        return
    after = free_device_memory(setup.device)
    common = base | {
        "build_s": time.perf_counter() - start,
        "static_mb": None if before is None else (after - before) / MB,
        "deploy": None if built.report is None else deploy_summary(built.report),
    }
    print(f"{name}: built in {common['build_s']:.1f} s" + (f"; {built.report.describe()}" if built.report else ""))
    for px in setup.px:
        print(f"  {name} {px} px: warm-up (compile / Triton JIT and autotune) and timing ...", flush=True)
        inputs = unet_inputs(setup, px)
        row = common | {"px": px}
        try:
            timer = time_cuda if setup.device.type == "cuda" else time_cpu
            compile_before = compile_seconds()
            timing = timer(lambda inputs=inputs: step(built.module, inputs), warmup, repeats)
            row["compile_s"] = compile_breakdown(compile_before, compile_seconds())
        except Exception as err:  # noqa: BLE001 (e.g. a compile crash at one resolution)
            on_row(row | {"status": "error", "error": failure(err)})
            continue
        if setup.rewarm and (spec_compile(name) is not None):
            row["rewarm_s"] = rewarm_seconds(lambda inputs=inputs: step(built.module, inputs), setup.device)
        fake_quant = None if built.fake_quant is None else rel_err(timing.output, built.fake_quant[px])
        if setup.profile and setup.device.type == "cuda":
            try:
                row["profile"] = kernel_profile(lambda inputs=inputs: step(built.module, inputs), top=setup.profile)
            except Exception as err:  # noqa: BLE001 (the timing row matters more than its breakdown)
                row["profile"] = {"error": failure(err)}
        on_row(
            row
            | {
                "status": "ok",
                "method": timing.method,
                "ms": statistics.median(timing.samples_ms),
                "ms_min": min(timing.samples_ms),
                "ms_max": max(timing.samples_ms),
                "samples": len(timing.samples_ms),
                "warmup_s": timing.warmup_s,
                "peak_mb": None if timing.peak_bytes is None else timing.peak_bytes / MB,
                "output_finite": bool(torch.isfinite(timing.output).all()),
                "rel_err_vs_fp16": rel_err(timing.output, setup.reference[px]),
                "rel_err_vs_fake_quant": fake_quant,
            }
        )
        del timing
    built = None  # drop the last reference before freeing device memory
    if name.endswith(tuple(COMPILE_MODES)) or name == "torchao":
        torch._dynamo.reset()  # compiled code and guards hold on to the module
    free_device_memory(setup.device)


def spec_compile(name: str) -> str | None:
    """The compile mode of a variant name (ours or an FP16 peer), None for an eager one or torchao."""
    suffix = name.rsplit("_", 1)[-1]
    return suffix if suffix in COMPILE_MODES else None


def rewarm_seconds(call: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds to be ready again after ``torch._dynamo.reset()``: a new process on the same machine, whose
    compiles hit Inductor's on-disk FX graph / autotune caches and Triton's kernel cache (what a user's second
    start costs; the first is ``warmup_s``)."""
    torch._dynamo.reset()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compile_seconds() -> dict[str, float]:
    """torch.compile's own timers so far (Dynamo tracing, AOT, Inductor codegen, kernel compiles), summed."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: sum(times) for name, times in compilation_time_metrics.items()}


def compile_breakdown(before: dict[str, float], after: dict[str, float], top: int = 12) -> dict[str, float]:
    """The ``top`` compile timers that grew between two :func:`compile_seconds` snapshots: where a warm-up went
    (nested timers overlap, so they do not add up)."""
    grown = {name: after[name] - before.get(name, 0.0) for name in after}
    return {name: round(t, 2) for name, t in sorted(grown.items(), key=lambda kv: -kv[1])[:top] if t > 0.01}


def failure(err: Exception) -> str:
    print(traceback.format_exc(), file=sys.stderr)
    return f"{type(err).__name__}: {err}"[:2000]


# ---- results ------------------------------------------------------------------------------------
def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``baseline ms / ms`` against the FP16 rows at the same resolution (None where a baseline is missing)."""
    for row in rows:
        for key, baseline in BASELINES.items():
            match = [r for r in rows if r["variant"] == baseline and r["px"] == row["px"] and r["status"] == "ok"]
            row[key] = match[0]["ms"] / row["ms"] if match and row["status"] == "ok" else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# SDXL UNet step, batch 1: FP16 vs MixDQ Studio kernels — {meta['card']}",
        "",
        f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · {meta['unet']} · `{meta['command']}`",
        "",
        (
            "ms = median GPU time of one UNet step. method cuda_graph: the step captured in a CUDA graph, replays "
            "timed with CUDA events; events_back_to_back: CUDA events around back-to-back calls (the step could not "
            "be captured); perf_counter: CPU wall time per call. × = baseline ms / ms at the same px (> 1 is "
            "faster). Static MB: memory_allocated after building minus before; peak MB: max_memory_allocated over "
            "the timed step; deploy MB: exact bytes held by the deployed UNet (DeployReport); MB = 1e6 bytes. rel "
            "err: ‖out − ref‖/‖ref‖ of the output latent vs FP16 eager and vs our own fake-quant model."
        ),
        "",
        (
            "| variant | px | method | ms | × vs FP16 compiled | × vs FP16 regional | × vs FP16 eager | static MB "
            "| peak MB | deploy MB (× smaller) | rel err vs FP16 | rel err vs fake-quant | build s | warm-up s | status |"
        ),
        "|" + "---|" * 15,
    ]
    for r in rows:
        deployed = r.get("deploy")
        deploy_mb = "—" if not deployed else f"{deployed['weight_mb']:.0f} ({deployed['ratio']:.2f}×)"
        status = r["status"] if r["status"] != "error" else f"error: {r['error'].splitlines()[0][:120]}"
        lines.append(
            f"| {r['label']} | {r['px']} | {r.get('method', '—')} | {fmt(r.get('ms'), '.2f')} "
            f"| {fmt(r.get('vs_fp16_compiled'), '.2f')} | {fmt(r.get('vs_fp16_regional'), '.2f')} "
            f"| {fmt(r.get('vs_fp16_eager'), '.2f')} "
            f"| {fmt(r.get('static_mb'), '.0f')} | {fmt(r.get('peak_mb'), '.0f')} | {deploy_mb} "
            f"| {fmt(r.get('rel_err_vs_fp16'), '.2e')} | {fmt(r.get('rel_err_vs_fake_quant'), '.2e')} "
            f"| {fmt(r.get('build_s'))} | {fmt(r.get('warmup_s'))} | {status} |"
        )
    for r in rows:
        if r.get("deploy") and r["px"] == rows[0]["px"]:
            lines += ["", f"{r['label']}: {r['deploy']['describe']}"]
    for r in rows:
        if "by_category_ms" in r.get("profile", {}):
            parts = ", ".join(f"{name} {ms:.2f}" for name, ms in r["profile"]["by_category_ms"].items())
            lines += ["", f"GPU ms by kernel category, {r['label']} {r['px']} px (uncaptured, profiler): {parts}"]
    for r in rows:
        if r.get("rewarm_s") is not None:
            lines += [
                "",
                (
                    f"warm-up again after torch._dynamo.reset() (warm caches), {r['label']} {r['px']} px: "
                    f"{r['rewarm_s']:.1f} s"
                ),
            ]
    for r in rows:
        if r.get("compile_s"):
            parts = ", ".join(f"{name} {t:.1f}" for name, t in list(r["compile_s"].items())[:6])
            lines += ["", f"warm-up: torch.compile timers (s, nested), {r['label']} {r['px']} px: {parts}"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    add_speedups(rows)
    (out / "gpu_unet.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, allow_nan=False) + "\n")
    (out / "gpu_unet.md").write_text(markdown(meta, rows))


def versions() -> dict[str, str]:
    found = {}
    for package in ("triton", "diffusers", "torchao"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = "not installed"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_unet.json and gpu_unet.md")
    parser.add_argument("--px", type=int, nargs="+", default=[1024, 512], help="image sizes (default: 1024 512)")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, run in this order; {', '.join(PEERS)} or ours: <config>[_<option>...][_<compile>], "
        f"config {'|'.join(OUR_CONFIGS)}, options {'|'.join(OPTIONS)}, compile {'|'.join(COMPILE_MODES)} "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls first: compile, Triton JIT and autotune (default: 3)"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed replays (or samples) per row (default: 30)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run: no graphs, no memory)")
    parser.add_argument(
        "--profile",
        nargs="?",
        type=int,
        const=15,
        default=0,
        metavar="TOP",
        help="add GPU time by kernel category (torch.profiler) and the TOP kernels (default 15) to each CUDA row",
    )
    parser.add_argument(
        "--rewarm",
        action="store_true",
        help="compiled rows: also time a second warm-up after torch._dynamo.reset(), with the compile caches warm",
    )
    parser.add_argument("--tiny", action="store_true", help="the embedded model's small UNet config (smoke runs)")
    parser.add_argument("--mixed-config", type=Path, help="PrecisionConfig JSON for the w4a8 variants")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in args.variants:
        try:
            parse_variant(name)
        except ValueError as err:
            parser.error(str(err))
    bad_px = [px for px in args.px if px % 64]
    if bad_px:
        parser.error(f"--px must be multiples of 64 (latent px/8 halved by the down blocks), got {bad_px}")
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu (with --tiny) for a smoke run")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config_path = TINY_UNET_CONFIG if args.tiny else FULL_UNET_CONFIG
    mixed_path = args.mixed_config or (TINY_MIXED_CONFIG if args.tiny else FULL_MIXED_CONFIG)
    wants_mixed = any(v.startswith("w4a8") for v in args.variants)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    unet_config = json.loads(config_path.read_text())
    state = random_state_dict(unet_config, device, dtype)
    setup = Setup(
        unet_config=unet_config,
        state=state,
        device=device,
        dtype=dtype,
        text=text_inputs(unet_config, device, dtype),
        px=args.px,
        mixed_config=PrecisionConfig.load(mixed_path) if wants_mixed else None,
        profile=args.profile,
        rewarm=args.rewarm,
    )
    calibrate_and_reference(setup, act_bits_needed(args.variants, setup.mixed_config))
    params = sum(t.numel() for t in state.values())
    cpu_name = f"CPU {platform.processor() or platform.machine()}"
    meta = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "device": str(device),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        **versions(),
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["gpu_unet.py", *argv]),
        "unet": f"{config_path.relative_to(ROOT)} ({params / 1e6:.0f}M params, random weights, {str(dtype)[6:]})",
        "px": args.px,
        "variants": args.variants,
        "repeats": args.repeats,
        "mixed_config": str(mixed_path.relative_to(ROOT) if mixed_path.is_relative_to(ROOT) else mixed_path),
        "setup_s": time.perf_counter() - start,
    }
    print(f"setup (random weights, FP16 reference, calibration) {meta['setup_s']:.1f} s on {meta['card']}")
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        write_results(args.out, meta, rows)
        ms = f"{row['ms']:.2f} ms ({row['method']})" if row["status"] == "ok" else row["status"]
        print(f"  {row['variant']} {row['px']} px: {ms}", flush=True)

    write_results(args.out, meta, rows)
    for name in args.variants:
        bench_variant(name, setup, args.warmup, args.repeats, on_row)
    meta["total_s"] = time.perf_counter() - start
    write_results(args.out, meta, rows)
    print(markdown(meta, rows))
    return rows


if __name__ == "__main__":
    main()
