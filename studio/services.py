"""What the studio's callbacks call: plain Python over the mixdq library, testable without Gradio.

Two kinds of objects: a :class:`SensitivitySource` (a sensitivity table, its model's layer
inventory, an allocator and a precomputed Pareto front; read-only once built) and a
:class:`ModelWorkspace` (the loaded pipeline; image generation holds its lock because one UNet is
switched between FP and quantized). Per-user choices travel in arguments, never in globals.
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mixdq.allocate import AUTO, PROTECTED_WEIGHTS, AllocationResult, Allocator, InfeasibleBudgetError
from mixdq.allocate.pareto import pareto_front
from mixdq.config import ConfigError, PrecisionConfig
from mixdq.config_io import quote
from mixdq.deploy.runner import DeployOutOfMemoryError
from mixdq.inventory import (
    UNetInventory,
    forward_order_key,
    inventory_fingerprint,
    layer_inventory,
    non_layer_param_count,
)
from mixdq.memory import MB, average_weight_bits, weight_memory
from mixdq.models import EMBEDDED_MODEL_ID, ModelNotAvailableError
from mixdq.sensitivity.published import SDXL_TURBO_MODEL_ID, load_published_table, sdxl_turbo_inventory
from mixdq.sensitivity.table import GROUP_METRIC, PROTECTED_SHARE, select_protected
from studio.plots import Spec, bits_heatmap, memory_bar, pareto_chart, ssim_to_db, unet_heatmap

PUBLISHED_LABEL = "SDXL-Turbo (published by the MixDQ authors)"
DEFAULT_BITS = 4.0  # the weight slider's start, where the background solver starts too
BITS_STEP = 0.05  # weight-budget slider resolution (MixDQ's band is ±0.02 bits, so finer steps add nothing)
FRONT_POINTS = 24
# The Budget tab's choices of what a weight budget charges for the protected layers (mixdq.allocate's
# PROTECTED_WEIGHTS, the CLI's --protected-weights), each with the line the page shows.
PROTECTED_MODES = dict(
    zip(
        PROTECTED_WEIGHTS,
        (
            "FP16, counted at 16 bits in the budget (what memory costs; 8.00 bits cannot keep every layer at 8)",
            "FP16, not counted: the budget averages over the other layers (memory still pays their FP16)",
            "MixDQ's: weights allocated like any other layer, only the activations stay FP16",
        ),
        strict=True,
    )
)
DEFAULT_PROTECTED = PROTECTED_WEIGHTS[0]  # "inside", the allocator's default


@dataclass
class SensitivitySource:
    """A sensitivity table with everything needed to explore and allocate it."""

    label: str
    model_id: str
    table: pd.DataFrame
    inventory: UNetInventory
    allocator: Allocator
    front: pd.DataFrame  # weight Pareto front (approximate solver) for the plot
    # Where users drag the weight slider now (average bits): the background solver works outward from here.
    # A scheduling hint shared by the sessions of this source, never part of a result.
    focus_bits: float = DEFAULT_BITS
    # protected_weights mode -> (allocator, front), built on first use; "inside" is ``allocator`` and ``front``
    by_mode: dict[str, tuple[Allocator, pd.DataFrame]] = field(default_factory=dict)

    @classmethod
    def build(cls, label: str, model_id: str, table: pd.DataFrame, inventory: UNetInventory) -> SensitivitySource:
        protected = select_protected(table, PROTECTED_SHARE)
        allocator = Allocator(table, protected=protected, inventory=inventory, model_id=model_id)
        return cls(label, model_id, table, inventory, allocator, _front(allocator))

    def allocator_for(self, protected_weights: str = DEFAULT_PROTECTED) -> Allocator:
        """The allocator whose weight budgets count the protected layers as ``protected_weights`` says (one of
        :data:`PROTECTED_MODES`); each keeps its solved allocations between calls."""
        return self._mode(protected_weights)[0]

    def front_for(self, protected_weights: str = DEFAULT_PROTECTED) -> pd.DataFrame:
        return self._mode(protected_weights)[1]

    def _mode(self, protected_weights: str) -> tuple[Allocator, pd.DataFrame]:
        if protected_weights == self.allocator.protected_weights:
            return self.allocator, self.front
        if protected_weights not in self.by_mode:
            allocator = Allocator(
                self.table,
                protected=self.allocator.protected,
                inventory=self.inventory,
                model_id=self.model_id,
                protected_weights=protected_weights,
            )
            self.by_mode[protected_weights] = (allocator, _front(allocator))
        return self.by_mode[protected_weights]

    @functools.cached_property
    def order(self) -> list[str]:
        return sorted((i.name for i in self.inventory.layers), key=forward_order_key)

    @property
    def protected(self) -> tuple[str, ...]:
        return self.allocator.protected

    def prewarm(self, step: float, act_bits: float = 8.0) -> None:
        """Solve the exact ILP for every slider position (weights at ``step`` resolution, auto K, activations
        at ``act_bits``) so that releasing the slider is a lookup. Meant for a background thread."""
        low, high = self.weight_range_bits()
        budgets = np.arange(math.ceil(low / step + 1e-9), math.floor(high / step - 1e-9) + 1) * step
        remaining = {round(float(b), 6) for b in budgets}
        self.allocator.allocate_side("act", act_bits, AUTO, "cbc")
        while remaining:  # nearest to where the user is dragging first (focus_bits moves with the previews)
            budget = min(remaining, key=lambda b: (abs(b - self.focus_bits), b))
            remaining.discard(budget)
            self.allocator.allocate_side("weight", budget, AUTO, "cbc")

    def weight_range_bits(self, protected_weights: str = DEFAULT_PROTECTED) -> tuple[float, float]:
        return self.allocator_for(protected_weights).feasible_range("weight")

    def bits_to_mb(self, bits: float, protected_weights: str = DEFAULT_PROTECTED) -> float:
        return self.allocator_for(protected_weights).bits_to_mb(bits)

    def mb_to_bits(self, mb: float, protected_weights: str = DEFAULT_PROTECTED) -> float:
        return self.allocator_for(protected_weights).mb_to_bits(mb)

    def fp16_mb(self) -> float:
        return weight_memory(list(self.inventory.layers), None, self.inventory.other_params).total_bytes / MB


def _front(allocator: Allocator) -> pd.DataFrame:
    """The weight Pareto front (approximate solver) across ``allocator``'s feasible range, for the plot."""
    low, high = allocator.feasible_range("weight")
    budgets = np.linspace(low + 0.01, high - 0.01, FRONT_POINTS)
    return pareto_front(allocator, budgets, "weight", AUTO, "approx")


@functools.cache
def published_source() -> SensitivitySource:
    """The SDXL-Turbo data published by the MixDQ authors (no weights needed)."""
    return SensitivitySource.build(PUBLISHED_LABEL, SDXL_TURBO_MODEL_ID, load_published_table(), sdxl_turbo_inventory())


# ---- sensitivity view -----------------------------------------------------------------------------
def sensitivity_figures(source: SensitivitySource, target: str, bit: int) -> tuple[Spec, Spec]:
    """Quality (SQNR dB) and content (SSIM) heatmaps of ``target`` sensitivities at ``bit``."""
    table = source.table
    figures = []
    for group in ("quality", "content"):
        metric = GROUP_METRIC[group]
        rows = table[(table.group == group) & (table.target == target) & (table.metric == metric) & (table.bit == bit)]
        members = set(table.layer[table.group == group])
        names = [n for n in source.order if n in members]
        raw = dict(zip(rows.layer, rows.value, strict=True))
        sizes = dict(zip(rows.layer, rows["size"], strict=True))
        side = "weights" if target == "weight" else "activations"
        if metric == "sqnr":
            figures.append(
                unet_heatmap(
                    names, raw, f"Quality layers: UNet-output SQNR, {side} at {bit} bits", "SQNR dB", sizes=sizes
                )
            )
        else:
            shown = {n: ssim_to_db(v) for n, v in raw.items()}
            hover = {n: f"SSIM {v:.5f}" for n, v in raw.items()}
            title = f"Content layers: image SSIM, {side} at {bit} bits"
            figures.append(unet_heatmap(names, shown, title, "−10·log10(1−SSIM)", hover, sizes))
    return figures[0], figures[1]


def most_sensitive(source: SensitivitySource, target: str, bit: int, count: int = 8) -> pd.DataFrame:
    """The ``count`` most damaging layers per group at ``bit`` (lowest SQNR / SSIM)."""
    table = source.table
    parts = []
    for group, metric in GROUP_METRIC.items():
        rows = table[(table.group == group) & (table.target == target) & (table.metric == metric) & (table.bit == bit)]
        parts.append(rows.nsmallest(count, "value")[["group", "layer", "metric", "value", "size"]])
    return pd.concat(parts, ignore_index=True)


# ---- budget view ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationView:
    """What the budget view shows for one allocation."""

    result: AllocationResult
    exact: bool  # the ILP's answer (solved now or earlier), not the greedy preview
    figure: Spec
    memory: str  # HTML bars
    pareto: Spec
    summary: str


def allocate(
    source: SensitivitySource,
    weight_budget: float,
    unit: str,
    act_bits: float | None,
    k: float | str,
    exact: bool,
    protected_weights: str = DEFAULT_PROTECTED,
) -> AllocationView:
    """Allocate at a weight budget (``unit`` "bits" or "MB") and activation budget (None = FP16), the protected
    layers' weights counted as ``protected_weights`` says (:data:`PROTECTED_MODES`).

    ``exact=True`` solves the CBC ILP; ``exact=False`` (slider preview) returns the ILP's answer when it
    is already solved (a lookup: the studio solves slider positions in the background) and the
    millisecond greedy otherwise. Raises :class:`InfeasibleBudgetError` with the feasible range.
    """
    bits = round(weight_budget, 6)
    kwargs = {"weight_mb": weight_budget} if unit == "MB" else {"weight_bits": bits}
    allocator = source.allocator_for(protected_weights)
    if not exact and protected_weights == DEFAULT_PROTECTED:  # a drag: the background solver works next to it
        source.focus_bits = bits if unit != "MB" else source.mb_to_bits(weight_budget)
    solved = (
        unit != "MB"
        and allocator.is_solved("weight", bits, k, "cbc")
        and (act_bits is None or allocator.is_solved("act", act_bits, AUTO, "cbc"))
    )
    exact = exact or solved
    result = allocator.allocate(**kwargs, act_bits=act_bits, k=k, act_k=AUTO, solver="cbc" if exact else "approx")
    weight = result.weight
    title = f"Allocation: {weight.average_bits:.3f} average weight bits ({'exact ILP' if exact else 'preview'})"
    figure = bits_heatmap(source.order, {n: result.config.layer_weight_bits(n) for n in source.order}, title)
    memory = memory_bar(source.fp16_mb(), result.weight_mb)
    pareto = pareto_figure(source, (result.weight_mb, weight.score), protected_weights)
    groups = ", ".join(f"{g} {s.average:.2f}" for g, s in weight.groups.items())
    act = result.act
    solve_ms = 1000 * (weight.seconds + (act.seconds if act else 0))
    act_text = (
        "activations FP16" if act is None else f"activations {act.average_bits:.2f} bits ({act.solver}, {act.status})"
    )
    summary = (
        f"weights {weight.average_bits:.3f} bits (groups: {groups}; K = {weight.k:.3f}), {act_text}; "
        f"UNet weights {result.weight_mb:,.1f} MB vs FP16 {source.fp16_mb():,.1f} MB "
        f"({source.fp16_mb() / result.weight_mb:.2f}x smaller); {protected_text(source, result, protected_weights)}; "
        f"solver {weight.solver}, status {weight.status}, {solve_ms:.0f} ms"
        + (" (solved in the background before you asked)" if solved else "")
    )
    return AllocationView(result, exact, figure, memory, pareto, summary)


def protected_text(source: SensitivitySource, result: AllocationResult, protected_weights: str) -> str:
    """What the weight budget counted for the protected layers, with the averages over every layer (memory) and
    over the allocated layers (what the solver spread)."""
    weight, count = result.weight, len(source.protected)
    averages = f"all layers {weight.overall_bits:.3f} bits, allocated layers {weight.allocated_bits:.3f}"
    return {
        "inside": f"{count} protected layers' weights FP16, counted at 16 bits in the budget ({averages})",
        "outside": f"{count} protected layers' weights FP16, not counted in the budget ({averages})",
        "act_only": f"{count} protected layers' weights allocated too, their activations FP16 ({averages})",
    }[protected_weights]


def pareto_figure(
    source: SensitivitySource, current: tuple[float, float] | None = None, protected_weights: str = DEFAULT_PROTECTED
) -> Spec:
    """Score (size-weighted normalized sensitivity) against UNet MB along the precomputed front of the
    ``protected_weights`` mode, with ``current`` = (MB, score) of the shown allocation marked."""
    front = source.front_for(protected_weights)
    return pareto_chart(front.mb.tolist(), front.score.tolist(), current)


def imported_view(source: SensitivitySource, config: PrecisionConfig, name: str) -> tuple[Spec, str, Spec, str]:
    """(allocation heatmap, memory bars, frontier, summary) of an imported config, as the budget view shows an
    allocation: the import replaces what that view shows. The frontier has no mark (the file has no score)."""
    title = f"Imported {name}: {average_weight_bits(list(source.inventory.layers), config):.3f} average weight bits"
    figure = bits_heatmap(source.order, {n: config.layer_weight_bits(n) for n in source.order}, title)
    mb = weight_memory(list(source.inventory.layers), config, source.inventory.other_params).total_bytes / MB
    summary = f"imported {name}: " + config_summary(config, source.inventory)
    return figure, memory_bar(source.fp16_mb(), mb), pareto_figure(source), summary


def infeasible_message(err: InfeasibleBudgetError) -> str:
    return f"Infeasible budget: {err}"


# ---- how the chosen bits run ---------------------------------------------------------------------------
# label -> PrecisionConfig.weight_clip
WEIGHT_SCALES = {"min-max (MixDQ)": "minmax", "MSE-clipped per row (ours)": "mse"}
STUDIO_FP8 = "a8"  # the FP8 checkbox's mixdq.config.FP8_CHOICES key


def with_run_options(
    config: PrecisionConfig, layers_inventory: UNetInventory, weight_scales: str, fp8: bool
) -> PrecisionConfig:
    """:meth:`PrecisionConfig.with_run_options` for the page's choices: a :data:`WEIGHT_SCALES` label and the FP8
    checkbox, which means :data:`STUDIO_FP8` (every A8 linear: activations, and 8-bit weights; 4- and 2-bit weights
    keep their integer grid; the fastest measured paths on Hopper / Ada GPUs, README, Measured)."""
    if weight_scales not in WEIGHT_SCALES:
        raise ValueError(f"weight scales must be one of {list(WEIGHT_SCALES)}, got {weight_scales!r}")
    fp8_choice = STUDIO_FP8 if fp8 else "none"
    return config.with_run_options(list(layers_inventory.layers), WEIGHT_SCALES[weight_scales], fp8_choice)


def run_options_text(config: PrecisionConfig) -> str:
    """What the options change, for the compare report and the export status ('' for MixDQ's defaults)."""
    parts = []
    if config.weight_clip == "mse":
        parts.append("MSE-clipped weight scales")
    if config.fp8:
        parts.append(f"{len(config.fp8)} A8 linear layers in FP8 e4m3")
    return ", ".join(parts)


# ---- export / import --------------------------------------------------------------------------------
def export_config(
    config: PrecisionConfig, layers_inventory: UNetInventory, directory: str | Path | None = None
) -> list[Path]:
    """Write the config as JSON and, where MixDQ's format can say it, as MixDQ yaml (the CLI's file names:
    :meth:`PrecisionConfig.save_mixdq_yaml`); return the paths. MixDQ's yaml has min-max scales and int8 only: a
    config with MSE-clipped scales or FP8 layers is written as JSON alone (:func:`yaml_refusal` says why)."""
    directory = Path(directory or tempfile.mkdtemp(prefix="mixdq-config-"))
    directory.mkdir(parents=True, exist_ok=True)
    stem = _config_stem(config)
    paths = [config.save(directory / f"{stem}.json")]
    try:
        paths += config.save_mixdq_yaml(directory, stem, list(layers_inventory.layers))
    except ConfigError:
        pass  # yaml_refusal tells the page why
    return paths


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint the Export tab wrote: its folder, the folder as one .zip, and their sizes beside the config's."""

    folder: Path
    archive: Path
    unet_bytes: int  # the UNet's tensor file
    folder_bytes: int  # everything in the folder (the FP16 text encoders and VAE included)
    accounted_bytes: int  # mixdq.memory.weight_memory of the config: the deploy accounting
    dtype: torch.dtype  # the saved UNet's float dtype (the accounting counts FP16)

    def summary(self) -> str:
        ratio = self.unet_bytes / self.accounted_bytes
        held = "" if self.dtype in (torch.float16, torch.bfloat16) else (
            f", saved in {str(self.dtype).removeprefix('torch.')} (the model's dtype here), so its FP parameters "
            "and scales take more than the FP16 accounting"
        )  # fmt: skip
        return (
            f"checkpoint {self.archive.name}: UNet tensors {self.unet_bytes / MB:,.2f} MB (config accounting "
            f"{self.accounted_bytes / MB:,.2f} MB, {ratio:.3f}x{held}); whole folder {self.folder_bytes / MB:,.2f} "
            "MB with the text encoders and VAE; load it with mixdq.load_quantized or python app.py --model"
        )


def save_checkpoint(
    workspace: ModelWorkspace, config: PrecisionConfig, directory: str | Path | None = None
) -> SavedCheckpoint:
    """Write a checkpoint of ``config`` for the loaded model with :func:`mixdq.deploy.checkpoint.export_checkpoint`
    (what ``mixdq export`` runs: a deployed, unfused copy of the UNet; the FP16 one stays for Compare), calibrated
    as ``mixdq export`` calibrates, and zip it for download."""
    import zipfile

    from mixdq.cli import CALIBRATION_STEPS
    from mixdq.deploy.checkpoint import TENSOR_FILE, UNET_FOLDER, export_checkpoint

    config.validate(workspace.layers)
    directory = Path(directory or tempfile.mkdtemp(prefix="mixdq-checkpoint-"))
    folder = directory / _config_stem(config)
    with workspace.lock:
        ranges = workspace.act_ranges(CALIBRATION_STEPS) if config.act_bits else None
        try:
            export_checkpoint(workspace.pipe, config, ranges, folder, progress=True)
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            raise DeployOutOfMemoryError(
                f"the GPU ran out of memory while deploying the copy to save ({str(err).splitlines()[0][:160]}); "
                "nothing was saved. Close other GPU programs, or run python -m mixdq export on its own."
            ) from None
    archive = directory / f"{folder.name}.zip"  # the stem has dots (w4.02): no with_suffix
    # stored, not deflated: packed codes and FP16 weights hardly compress, and deflating GBs takes minutes
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(directory))
    accounted = weight_memory(workspace.layers, config, workspace.inventory.other_params).total_bytes
    return SavedCheckpoint(
        folder,
        archive,
        (folder / UNET_FOLDER / TENSOR_FILE).stat().st_size,
        sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        accounted,
        workspace.pipe.unet.dtype,
    )


def yaml_refusal(config: PrecisionConfig, layers_inventory: UNetInventory) -> str | None:
    """Why the config cannot be written as MixDQ yaml, or None when it can."""
    try:
        config.to_mixdq_yaml(list(layers_inventory.layers))
    except ConfigError as err:
        return str(err)
    return None


def _config_stem(config: PrecisionConfig) -> str:
    allocation = config.metadata.get("allocation", {})
    bits = (allocation.get("weight") or {}).get("average_bits")
    act = (allocation.get("act") or {}).get("average_bits")
    name = config.model_id.rsplit("/", 1)[-1] or "model"
    return f"mixdq-{name}" + (f"-w{bits:.2f}" if bits else "") + (f"a{act:.0f}" if act else "")


# ---- the loaded model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the studio shows about its model before the weights are loaded."""

    model_id: str
    inventory: UNetInventory
    device: str  # "cpu" | "cuda"
    default_size: int  # pixels

    @classmethod
    def of_pipeline(cls, pipe) -> ModelInfo:
        layers = layer_inventory(pipe.unet)
        return cls(
            getattr(pipe, "model_id", "model"),
            UNetInventory(tuple(layers), non_layer_param_count(pipe.unet)),
            pipe.unet.device.type,
            pipe.default_sample_size * pipe.vae_scale_factor,
        )


class ModelWorkspace:
    """The model to generate with, its calibration and (when available) its sensitivity source.

    The pipeline may load in a background thread (:meth:`load_in_background`), so the studio serves its
    page while diffusers and the weights load; generation waits for it. Generation takes :attr:`lock`:
    the UNet is wrapped once and switched between FP and a config.
    """

    def __init__(self, info: ModelInfo, cache_dir: Path, table: pd.DataFrame | None = None, pipe=None) -> None:
        self.model_id = info.model_id
        self.inventory = info.inventory
        self.layers = list(info.inventory.layers)
        self.fingerprint = inventory_fingerprint(self.layers)
        self.cache_dir = cache_dir
        self.lock = threading.Lock()
        self._info = info
        self._pipe = pipe
        self._load_error: Exception | None = None
        self._loaded = threading.Event()
        if pipe is not None:
            self._loaded.set()
        self._ranges = None
        self._judges = None
        self._runner = None
        self.source = (
            SensitivitySource.build(f"{self.model_id} (loaded model)", self.model_id, table, self.inventory)
            if table is not None
            else None
        )

    @classmethod
    def from_pipeline(cls, pipe, cache_dir: Path, table: pd.DataFrame | None = None) -> ModelWorkspace:
        """A workspace around an already loaded pipeline."""
        return cls(ModelInfo.of_pipeline(pipe), cache_dir, table, pipe)

    def load_in_background(self, load: Callable[[], Any], after: threading.Event | None = None) -> threading.Thread:
        """Load the pipeline with ``load()`` in a daemon thread, once ``after`` is set (or 10 s passed)."""

        def run() -> None:
            if after is not None:
                after.wait(timeout=10)
            try:
                self._pipe = load()
            except Exception as err:  # noqa: BLE001 - any failure is reported to whoever needs the model
                self._load_error = err
                print(f"The model could not be loaded: {err}", file=sys.stderr, flush=True)
            finally:
                self._loaded.set()

        thread = threading.Thread(target=run, name="load-pipeline", daemon=True)
        thread.start()
        return thread

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def wait_for_pipeline(self):
        """The pipeline, once the background load is done; raises :class:`ModelNotAvailableError` if it failed."""
        self._loaded.wait()
        if self._pipe is None:
            raise ModelNotAvailableError(f"{self.model_id} could not be loaded: {self._load_error}")
        return self._pipe

    @property
    def pipe(self):
        return self.wait_for_pipeline()

    @property
    def device(self) -> torch.device:
        return torch.device(self._info.device)

    def default_size(self) -> int:
        return self._info.default_size

    def act_ranges(self, steps: int):
        """Calibrated activation ranges (cached on disk; computed once per step count)."""
        from mixdq.calibrate import calibrate

        if self._ranges is None or self._ranges[0] != steps:
            ranges = calibrate(self.pipe, num_inference_steps=steps, cache_dir=self.cache_dir, progress=True)
            self._ranges = (steps, ranges)
        return self._ranges[1]

    def judges(self):
        """(CLIP scorer, alignment checker) of the embedded model; ``(None, None)`` for other models,
        whose CLIP weights may not be on this machine."""
        if self._judges is None:
            self._judges = (None, None)
            if self.model_id == EMBEDDED_MODEL_ID:
                from mixdq.evaluate.embedded import embedded_checker, embedded_clip_scorer

                self._judges = (embedded_clip_scorer(), embedded_checker)
        return self._judges

    @property
    def runner(self):
        """FP16, simulated and deployed UNets of the pipeline (made on first use; holds the deployed copy)."""
        if self._runner is None:
            from mixdq.deploy.runner import DeployedRunner

            self._runner = DeployedRunner(self.pipe)
        return self._runner

    def compare(
        self,
        config: PrecisionConfig,
        prompt: str,
        seed: int,
        steps: int,
        size: int,
        on_stage=lambda _: None,
        compiled: bool = False,
    ) -> dict:
        """FP16, fake-quant simulation and deployed images from the same noise (:func:`mixdq.evaluate.compare`),
        their difference, and the embedded model's CLIP score and caption alignment of FP16 and deployed."""
        from mixdq.evaluate.compare import compare
        from mixdq.evaluate.metrics import to_pil

        config.validate(self.layers)
        with self.lock:
            ranges = self.act_ranges(steps) if config.act_bits else None
            result = compare(self.runner, config, ranges, prompt, seed, steps, size, on_stage, compiled)
        fp, deployed = result.fp16.image, result.deployed.image
        metrics = {}
        scorer, checker = self.judges()
        if scorer is not None:
            from mixdq.evaluate.metrics import clip_score

            drawn = result.prompt_read  # what the pipeline was given (mixdq.models.read_prompt)
            scores = clip_score(scorer, torch.stack([fp, deployed]), [drawn, drawn])
            metrics["clip_fp"], metrics["clip_quant"] = (float(v) for v in scores)
            metrics["aligned_fp"], metrics["aligned_quant"] = (
                _aligned(checker, image, drawn) for image in (fp, deployed)
            )
        return {
            "result": result,
            "fp": to_pil(fp),
            "quant": to_pil(deployed),
            "simulated": to_pil(result.simulated.image),
            "diff": _diff_image(fp, deployed),
            "metrics": metrics,
        }


def compare_report(out: dict, device_type: str, config_name: str = "") -> str:
    """The Compare view's text for :meth:`ModelWorkspace.compare`'s result: the config (``config_name``) and seed
    used, which path made which image, image distances, measured times and memory beside the accounting, and
    what the deploy made."""
    from mixdq.evaluate.compare import median_step_ms

    result = out["result"]
    m = out["metrics"]
    fp16, deployed, deploy = result.fp16, result.deployed, result.deploy
    fp_name = "FP (FP32 on the CPU)" if device_type == "cpu" else "FP16"
    step_unit = "GPU ms" if deployed.timing_method.startswith("cuda") else "ms (CPU wall clock)"
    method = {"cuda_graph": "CUDA graph replays, CUDA events", "cuda_events": "eager, CUDA events"}
    how = method.get(deployed.timing_method, "wall clock")
    how = ("torch.compile'd blocks, " if deployed.compiled else "eager PyTorch, ") + how

    def dist(d: dict) -> str:
        return f"SSIM {d['ssim']:.4f} · PSNR {d['psnr']:.2f} dB"

    lines = [
        f"**config**: {config_name or 'unnamed'} · **seed** {result.seed}",
        (
            f"**deployed image** computed on: **{result.kernel_path}**; seed {result.seed}, {result.steps} step(s), "
            f"{result.size} px"
        ),
        (
            f"**deployed vs {fp_name}**: {dist(result.deployed_vs_fp16)}  ·  **simulation vs {fp_name}**: "
            f"{dist(result.simulated_vs_fp16)}  ·  **deployed vs simulation**: {dist(result.deployed_vs_simulated)}"
        ),
    ]
    if "clip_fp" in m:
        verdict = {True: "all attributes right", False: "attributes wrong", None: "caption not in the model's language"}
        lines.append(
            f"**CLIP score** (embedded CLIP) FP {m['clip_fp']:.1f} · deployed {m['clip_quant']:.1f} · "
            f"**alignment checker** FP: {verdict[m['aligned_fp']]}, deployed: {verdict[m['aligned_quant']]}"
        )
    speedup = median_step_ms(fp16) / median_step_ms(deployed)
    lines += [
        f"**UNet step** ({step_unit}, median, {how}): {fp_name} {median_step_ms(fp16):.2f} · deployed "
        f"{median_step_ms(deployed):.2f} ({speedup:.2f}x)  ·  **per image** end to end: {fp_name} "
        f"{fp16.seconds:.2f} s · deployed {deployed.seconds:.2f} s"
        + (
            f"  ·  first-image warm-up (CUDA graph capture) {deployed.warmup_seconds:.1f} s"
            if deployed.warmup_seconds
            else ""
        ),
        f"**UNet weights**: {fp_name} {result.fp16_bytes / MB:,.1f} MB · deployed "
        + (
            f"{result.measured_bytes / MB:,.1f} MB measured on the GPU"
            if deploy.measured_bytes is not None
            else f"{result.measured_bytes / MB:,.1f} MB held"
        )
        + f", {result.fp16_bytes / result.measured_bytes:.2f}x smaller (accounting {result.accounted_bytes / MB:,.1f} MB, "
        f"{result.fp16_bytes / result.accounted_bytes:.2f}x smaller)"
        + (f"  ·  peak during the deployed image {deployed.peak_bytes / MB:,.0f} MB" if deployed.peak_bytes else ""),
        f"**deploy**: {deploy.report.describe()}; {deploy.fused_attentions} attentions with fused projections"
        + (f", {deploy.grouped_blocks} blocks with grouped unpacking" if deploy.grouped_blocks else "")
        + (f"; deployed in {deploy.seconds:.1f} s" if result.redeployed else "; reused (same config as before)"),
    ]
    options = run_options_text(result.config)
    if options:
        lines.append(f"run options: {options}")
    lines += [f"note: {note}" for note in result.notes]
    return "  \n".join(lines)


def prompt_truncation(tokenizer, prompt: str) -> str | None:
    """What the text encoders will not read of ``prompt`` (CLIP reads ``model_max_length`` tokens, start and end
    included, and drops the rest), as a notice for the page; None when the whole prompt fits."""
    limit = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    if len(ids) <= limit:
        return None
    dropped = tokenizer.decode(ids[limit - 1 : -1])
    return (
        f"The prompt is {len(ids)} tokens; the text encoders read the first {limit}, so the end was ignored: "
        f"{quote(dropped)}. Shorten the prompt to keep all of it."
    )


def _aligned(checker, image: torch.Tensor, prompt: str) -> bool | None:
    """The checker's verdict, or ``None`` when the prompt is not in the embedded model's caption language."""
    try:
        return bool(checker(image, prompt))
    except ValueError:
        return None


def _diff_image(a: torch.Tensor, b: torch.Tensor) -> Image.Image:
    """|a − b| averaged over channels, amplified 4x so small errors are visible."""
    diff = ((a - b).abs().mean(0) * 4).clamp(0, 1)
    return Image.fromarray((diff.numpy() * 255).round().astype(np.uint8))


def config_summary(config: PrecisionConfig, inventory: UNetInventory) -> str:
    layers = list(inventory.layers)
    mem = weight_memory(layers, config, inventory.other_params)
    return (
        f"{config.model_id or 'model'}: {average_weight_bits(layers, config):.3f} average weight bits, "
        f"{len(config.act_bits)} layers with quantized activations, {len(config.protected)} protected; "
        f"{mem.total_bytes / MB:,.1f} MB ({mem.ratio:.2f}x smaller than FP16)"
    )


__all__ = [
    "PUBLISHED_LABEL",
    "ConfigError",
    "DeployOutOfMemoryError",
    "InfeasibleBudgetError",
    "ModelInfo",
    "ModelWorkspace",
    "SavedCheckpoint",
    "SensitivitySource",
    "allocate",
    "compare_report",
    "config_summary",
    "export_config",
    "imported_view",
    "infeasible_message",
    "most_sensitive",
    "pareto_figure",
    "prompt_truncation",
    "published_source",
    "run_options_text",
    "save_checkpoint",
    "sensitivity_figures",
    "with_run_options",
    "yaml_refusal",
]
