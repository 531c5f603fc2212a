"""A pipeline's UNet deployed on the kernels beside its FP16 UNet, re-deployable per config, timed on the GPU.

What users compare must be what they would ship: the deployed model (packed weights, our kernels), not only
the fake-quant simulation. :class:`DeployedRunner` keeps the pipeline's own UNet as the one copy of the FP
weights (it also renders the FP16 and simulated images) and packs a copy of it per config, so a new config
never reloads the pipeline. On CUDA every UNet call runs as a CUDA graph, one per input shape, and is timed
with CUDA events: eager PyTorch is launch-bound on these models and would time the CPU, not the kernels.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from kernels import fp8
from mixdq.config import PrecisionConfig
from mixdq.deploy.api import DeployReport, deploy
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.deploy.unpack_groups import group_unpacking
from mixdq.quant.api import quantization_off, unet_of

MAX_GRAPHS = 2  # captured shapes kept per UNet: each holds its own activation memory pool


class DeployOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory while deploying; the previously deployed UNet is kept."""


def fp8_fallback(config: PrecisionConfig, device: torch.device) -> tuple[PrecisionConfig, str | None]:
    """``config`` runnable on ``device``: FP8 layers need FP8 tensor cores (compute capability 8.9+) on CUDA.

    Returns the config and a note saying what changed, or ``(config, None)``. FP8 layers then run int8 (the
    config's own bits on MixDQ's integer grid), in the simulation and the deployed model alike.
    """
    if not config.fp8 or device.type != "cuda" or fp8.fp8_supported(device):
        return config, None
    major, minor = torch.cuda.get_device_capability(device)
    note = (
        f"FP8 e4m3 is unavailable on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}, "
        f"FP8 needs 8.9+): its {len(config.fp8)} FP8 linears run int8 instead"
    )
    return replace(config, fp8=[]), note


def config_key(config: PrecisionConfig) -> str:
    """Identity of what a deploy depends on in a config (its bits and run options)."""
    return json.dumps(config.to_dict(), sort_keys=True)


@dataclass
class CallTimes:
    """Per-call time of a UNet's forward: GPU milliseconds on CUDA (events), wall milliseconds on CPU."""

    method: str  # "cuda_graph", "cuda_events" (eager, uncapturable) or "cpu_wall"
    _pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    _done: list[float] = field(default_factory=list)

    def add_events(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self._pending.append((begin, end))

    def add_ms(self, ms: float) -> None:
        self._done.append(ms)

    def ms(self) -> list[float]:
        for begin, end in self._pending:
            end.synchronize()
            self._done.append(begin.elapsed_time(end))
        self._pending.clear()
        return list(self._done)


class _Graph:
    """One captured UNet call: static inputs, the graph, its static output."""

    def __init__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = {name: t.clone() for name, t in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazily made per-stream state (cuBLAS workspaces, Triton JIT) first
            for _ in range(2):
                self._run(forward)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._run(forward)

    def _run(self, forward: Callable[..., Any]) -> torch.Tensor:
        x = self.inputs
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        return forward(
            x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False
        )[0]


class GraphedForward:
    """Stands in for a UNet's ``forward`` (an instance attribute, so ``unet.config`` & co. stay as they are).

    On CUDA each call of the pipeline's shape (sample, timestep, text embedding, ``text_embeds``/``time_ids``)
    copies its inputs into a captured graph and replays it; a call it cannot capture runs eagerly. Every call's
    time lands in :attr:`times`. ``capture_seconds`` is the time spent capturing (the warm-up a user waits for).
    """

    _GRAPHED_KWARGS: ClassVar[set[str]] = {
        "timestep_cond",
        "cross_attention_kwargs",
        "attention_mask",
        "encoder_attention_mask",
    }

    def __init__(self, unet: nn.Module, use_graphs: bool) -> None:
        self.forward = type(unet).forward.__get__(unet)
        self.device = next(unet.parameters()).device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.times = CallTimes(
            "cuda_graph" if self.use_graphs else "cuda_events" if self.device.type == "cuda" else "cpu_wall"
        )
        self.capture_seconds = 0.0
        self.capture_error: str | None = None

    def reset_times(self) -> CallTimes:
        self.times = CallTimes(self.times.method)
        self.capture_seconds = 0.0
        return self.times

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True, **kwargs):
        inputs = self._graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs, kwargs)
        if inputs is None:
            return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict, kwargs)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        graph = self.graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            try:
                graph = _Graph(self.forward, inputs)
            except Exception as err:  # noqa: BLE001 - a step that syncs cannot be captured: run it eagerly
                torch.cuda.synchronize()
                self.capture_error = f"{type(err).__name__}: {str(err)[:200]}"
                self.use_graphs = False
                self.times.method = "cuda_events"
                return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict, kwargs)
            self.capture_seconds += time.perf_counter() - start
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for name, t in inputs.items():
            graph.inputs[name].copy_(t)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.graph.replay()
        end.record()
        self.times.add_events(begin, end)
        out = graph.output.clone()
        return _unet_output(out, return_dict)

    def _graph_inputs(self, sample, timestep, encoder_hidden_states, added, kwargs) -> dict[str, torch.Tensor] | None:
        if not self.use_graphs or any(v is not None for v in kwargs.values()) or set(kwargs) - self._GRAPHED_KWARGS:
            return None
        if not added or set(added) != {"text_embeds", "time_ids"}:
            return None
        timestep = torch.as_tensor(timestep, device=self.device)
        return {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "text_embeds": added["text_embeds"],
            "time_ids": added["time_ids"],
        }

    def _eager(self, sample, timestep, encoder_hidden_states, added, return_dict, kwargs):
        if self.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = self.forward(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False, **kwargs
            )
            end.record()
            self.times.add_events(begin, end)
        else:
            start = time.perf_counter()
            out = self.forward(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False, **kwargs
            )
            self.times.add_ms(1000 * (time.perf_counter() - start))
        return _unet_output(out[0], return_dict)


def _unet_output(sample: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@dataclass(frozen=True)
class DeployedUNet:
    """One deploy of a config: the packed UNet and what it cost."""

    key: str
    unet: nn.Module
    report: DeployReport
    seconds: float  # copy + pack + fuse + group, wall clock
    measured_bytes: int | None  # GPU memory its tensors allocate (torch.cuda.memory_allocated delta); None on CPU
    fused_attentions: int
    grouped_blocks: int


@dataclass(frozen=True)
class Generation:
    """One image and how long it took."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1], on the host
    seconds: float  # end to end (text encoders + UNet steps + VAE), wall clock, after any capture
    step_ms: tuple[float, ...]  # per UNet call (see CallTimes.method)
    timing_method: str
    warmup_seconds: float  # CUDA-graph capture (and compile) this image needed first (0 once captured)
    peak_bytes: int | None  # peak GPU memory allocated during the image (CUDA)
    compiled: bool = False  # the UNet ran torch.compile'd blocks (regional compile)


@contextlib.contextmanager
def swapped_unet(pipe: Any, unet: nn.Module) -> Iterator[None]:
    """``pipe.unet`` is ``unet`` within the block."""
    previous = pipe.unet
    pipe.unet = unet
    try:
        yield
    finally:
        pipe.unet = previous


class DeployedRunner:
    """The FP16 / fake-quant UNet of ``pipe`` and, once :meth:`deploy` ran, a deployed copy of it.

    Not thread-safe: callers serialize (the studio holds its workspace lock).
    """

    def __init__(self, pipe: Any, use_graphs: bool = True) -> None:
        self.pipe = pipe
        self.fp_unet = unet_of(pipe)
        self.device = next(self.fp_unet.parameters()).device
        self.use_graphs = use_graphs
        self.current: DeployedUNet | None = None
        self._forwards: dict[int, GraphedForward] = {}
        self._compiled: set[int] = set()  # ids of deployed UNets whose blocks are compiled
        self._fp16_compiled: nn.Module | None = None  # a plain FP16 copy, compiled: the compiled baseline

    @property
    def kernel_path(self) -> str:
        """Where deployed layers compute, in words."""
        if self.device.type == "cuda":
            return f"Triton + cuBLAS kernels on {torch.cuda.get_device_name(self.device)}"
        return "PyTorch integer reference path on the CPU (the same packed codes the GPU kernels read)"

    @torch.no_grad()
    def deploy(
        self, config: PrecisionConfig, act_ranges: Any, on_stage: Callable[[str], None] = lambda _: None
    ) -> DeployedUNet:
        """The deployed UNet for ``config`` (the current one when the config is unchanged).

        Copies the FP UNet, packs it with :func:`mixdq.deploy.deploy` and takes the fastest measured paths
        (fused q/k/v; on CUDA grouped unpacking). On CUDA out of memory the new copy is dropped, the previous
        deploy stays, and :class:`DeployOutOfMemoryError` says so.
        """
        key = config_key(config)
        if self.current is not None and self.current.key == key:
            return self.current
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        start = time.perf_counter()
        unet = None
        try:
            on_stage("copying the FP16 UNet")
            unet = copy.deepcopy(self.fp_unet)
            with swapped_unet(self.pipe, unet):
                on_stage("packing weights (deploy)")
                report = deploy(self.pipe, config, act_ranges)
                on_stage("fusing q/k/v projections")
                fused = fuse_qkv_projections(self.pipe)
                grouped = _group_unpacking(self.pipe) if cuda else 0
        except torch.cuda.OutOfMemoryError as err:
            unet = None
            gc.collect()
            torch.cuda.empty_cache()
            kept = "the previous deployed model is kept" if self.current else "nothing is deployed"
            raise DeployOutOfMemoryError(
                f"the GPU ran out of memory while deploying ({str(err).splitlines()[0][:160]}); {kept}. "
                "Close other GPU programs or use a smaller model."
            ) from None
        gc.collect()
        if cuda:
            torch.cuda.synchronize(self.device)
        measured = torch.cuda.memory_allocated(self.device) - before if cuda else None
        deployed = DeployedUNet(key, unet, report, time.perf_counter() - start, measured, fused, grouped)
        self._drop_current()
        self.current = deployed
        return deployed

    def _drop_current(self) -> None:
        if self.current is None:
            return
        self._forwards.pop(id(self.current.unet), None)
        self._compiled.discard(id(self.current.unet))
        self.current = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def compiled(self) -> bool:
        """True when the deployed UNet (and so the FP16 baseline it is timed against) runs compiled."""
        return self.current is not None and id(self.current.unet) in self._compiled

    @torch.no_grad()
    def compile(self, on_stage: Callable[[str], None] = lambda _: None) -> None:
        """Regional ``torch.compile`` of the deployed UNet, and of a plain FP16 copy as its baseline (made once,
        an extra FP16 UNet in memory), so that both are timed compiled: eager PyTorch leaves the deployed
        layers' activation quantization unfused, which makes a deployed UNet look slower than it is. The
        compile itself runs lazily at the next image of each shape (its warm-up: minutes on a cold cache)."""
        from mixdq.deploy.compile import compile_repeated_blocks

        if self.current is None:
            raise RuntimeError("nothing is deployed yet: call deploy(config, act_ranges) first.")
        if self._fp16_compiled is None:
            on_stage("building the compiled FP16 baseline")
            plain = copy.deepcopy(self.fp_unet)
            deploy(plain, PrecisionConfig())  # every layer back to its plain nn.Linear / nn.Conv2d
            compile_repeated_blocks(plain)
            self._fp16_compiled = plain
        if not self.compiled:
            on_stage("compiling the deployed UNet's blocks (torch.compile, regional)")
            compile_repeated_blocks(self.current.unet)
            self._forwards.pop(id(self.current.unet), None)  # graphs of the eager blocks
            self._compiled.add(id(self.current.unet))

    @torch.no_grad()
    def generate(self, which: str, prompt: str, seed: int, steps: int, size: int, **pipe_kwargs) -> Generation:
        """One image from ``which`` UNet: ``"fp16"`` (exact FP), ``"simulated"`` (the fake-quant UNet as
        :func:`mixdq.quantize_` left it) or ``"deployed"`` (needs :meth:`deploy`). Same noise for all three.
        Once :meth:`compile` ran for the current deploy, ``"fp16"`` and ``"deployed"`` run compiled."""
        mode = contextlib.nullcontext()
        if which == "deployed":
            if self.current is None:
                raise RuntimeError("nothing is deployed yet: call deploy(config, act_ranges) first.")
            unet = self.current.unet
        elif which == "fp16" and self.compiled:
            unet = self._fp16_compiled
        elif which in ("fp16", "simulated"):
            unet = self.fp_unet
            mode = quantization_off(unet) if which == "fp16" else mode
        else:
            raise ValueError(f"which must be 'fp16', 'simulated' or 'deployed', got {which!r}.")
        compiled = which != "simulated" and self.compiled
        graphed = which != "simulated"  # fake-quant layers are the reference, not a speed: timed as they run
        forward = self._forward_of(unet, graphed)
        with swapped_unet(self.pipe, unet), mode, _installed(unet, forward):
            image, warmup, seconds, peak, times = self._image(forward, prompt, seed, steps, size, pipe_kwargs)
            if warmup > 0:  # this image waited for a capture: time one that only replays
                image, _, seconds, peak, times = self._image(forward, prompt, seed, steps, size, pipe_kwargs)
        return Generation(image, seconds, tuple(times.ms()), times.method, warmup, peak, compiled)

    def _forward_of(self, unet: nn.Module, graphed: bool) -> GraphedForward:
        key = id(unet) if graphed else -id(unet)
        if key not in self._forwards:
            self._forwards[key] = GraphedForward(unet, self.use_graphs and graphed)
        return self._forwards[key]

    def _image(self, forward: GraphedForward, prompt: str, seed: int, steps: int, size: int, pipe_kwargs: dict):
        from mixdq.models import sample, seeded_generator

        times = forward.reset_times()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        generator = seeded_generator(seed)
        image = sample(
            self.pipe,
            prompt,
            generator=generator,
            steps=steps,
            height=size,
            width=size,
            output_type="pt",
            **pipe_kwargs,
        )[0]
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        return image.float().cpu(), forward.capture_seconds, seconds, peak, times


def _group_unpacking(pipe: Any) -> int:
    """Grouped unpacking where a block qualifies (a config without 4/2-bit per-call unpacking has none)."""
    try:
        return group_unpacking(pipe)
    except ValueError:
        return 0


@contextlib.contextmanager
def _installed(unet: nn.Module, forward: GraphedForward) -> Iterator[None]:
    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward
