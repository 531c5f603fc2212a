"""The studio's layout and event wiring: a :class:`StudioPage` builds one tab per method and wires its events to
callbacks of a few lines around :mod:`studio.services`.

Every callback is :func:`guarded`: whatever it raises becomes one line in the page and the outputs it would have
changed keep what they show (allocation, images, loaded config). The events whose inputs a user can type out of
range run with ``preprocess=False``, so the callback sees the typed value and answers with what to do, instead of
Gradio refusing it with a server error the page does not show.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from mixdq.allocate import BAND, InfeasibleBudgetError
from mixdq.config import ACT_BITS, WEIGHT_BITS, ConfigError, PrecisionConfig
from mixdq.config_io import mixdq_yaml_pair
from mixdq.memory import average_weight_bits
from mixdq.models import EMBEDDED_MODEL_ID, TURBO_SAMPLING, ModelNotAvailableError
from mixdq.sensitivity.table import SensitivityTableError
from studio import services
from studio.plots import Spec, to_json
from studio.services import DeployOutOfMemoryError, ModelWorkspace, SensitivitySource

UNITS = ("average bits", "MB")
BITS_STEP = services.BITS_STEP
MB_STEP = 0.1
PRESETS = ("current allocation", "uniform W8A8", "uniform W4A8", "uniform W8A16 (weights only)")
MAX_SIZE = {"cpu": 256, "cuda": 1024}  # pixels: what one image costs in reasonable time on the device
MIN_SIZE = 64
SIZE_MULTIPLE = 8  # the VAE's latents are 8x smaller than the image
MAX_SEED = 2**32 - 1  # torch generators take 64-bit seeds; diffusers' numpy paths 32-bit ones
ACT_RANGE = (4.0, 8.0)
K_RANGE = (0.2, 2.0)
IMPORT_SUFFIXES = (".json", ".yaml", ".yml")
IMPORT_RULE = (
    "upload one .json config, or the two files of a MixDQ yaml pair (STEM_weight.yaml and STEM_act.yaml) together"
)
MAX_NOTICE_CHARS = 400


class StudioInputError(ValueError):
    """A page input the studio refuses; the message says what to do instead."""


# Refusals whose message is meant for the user as it is; anything else is a bug, reported as such.
_EXPECTED = (
    StudioInputError,
    ConfigError,
    InfeasibleBudgetError,
    ModelNotAvailableError,
    DeployOutOfMemoryError,
    SensitivityTableError,
)


def refusal_text(err: BaseException) -> str:
    """One bounded line for the page about ``err``."""
    if isinstance(err, _EXPECTED):
        text = str(err)
    else:
        text = (
            f"Something went wrong ({type(err).__name__}: {err}); nothing was changed. The server log has the details."
        )
    text = " ".join(text.split())
    return text if len(text) <= MAX_NOTICE_CHARS else text[: MAX_NOTICE_CHARS - 3] + "..."


def guarded(outputs: int, notice: int | None) -> Callable[[Callable], Callable]:
    """A Gradio callback that never fails the event: an exception leaves all ``outputs`` as they are (gr.skip())
    except output ``notice``, which gets :func:`refusal_text` (``None``: the line is shown as a gr.Warning). An
    unexpected exception's traceback goes to the server log."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)  # keeps the signature Gradio reads (inputs, the gr.Progress default)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the page must survive any input
                if not isinstance(err, _EXPECTED):
                    traceback.print_exc(file=sys.stderr)
                message = refusal_text(err)
                result = [gr.skip() for _ in range(outputs)]
                if notice is None:
                    gr.Warning(message)
                else:
                    result[notice] = message
                return result[0] if outputs == 1 else tuple(result)

        return run

    return decorate


@dataclass(frozen=True)
class ChosenConfig:
    """The config a session works with: what Compare and Export use and the Budget view shows."""

    config: PrecisionConfig
    name: str  # how the page names it: "allocation at 4.00 average bits" or "imported w4.json"
    label: str  # the sensitivity source whose model it is for


def build_demo(
    workspace: ModelWorkspace,
    sources: dict[str, Callable[[], SensitivitySource]],
    on_first_view: Callable[[], None] = lambda: None,
) -> gr.Blocks:
    """The four views: sensitivity heatmaps, the live budget, FP vs quantized images, export/import.
    ``on_first_view`` is called once a page has its first views (background work waits for it)."""
    return StudioPage(workspace, sources, on_first_view).build()


class StudioPage:
    """The page's components and callbacks. Per-user values live in its ``gr.State`` components only, so one
    page object serves every session; callbacks are plain methods, testable without a browser."""

    def __init__(
        self,
        workspace: ModelWorkspace,
        sources: dict[str, Callable[[], SensitivitySource]],
        on_first_view: Callable[[], None] = lambda: None,
    ) -> None:
        self.workspace = workspace
        self.sources = sources
        self.labels = list(sources)
        self.on_first_view = on_first_view
        self._shown_lock = threading.Lock()  # a session's "shown" dict is shared by its concurrent events
        first = self.source_of(self.labels[0])
        low, high, _, _ = _slider_bounds(first)
        self.start_bits = min(max(services.DEFAULT_BITS, low), high)
        self.start_mb = round(first.bits_to_mb(self.start_bits), 1)

    def source_of(self, label: str) -> SensitivitySource:
        if label not in self.sources:
            raise StudioInputError(f"Unknown sensitivity data {label!r}; choose one of {self.labels}.")
        return self.sources[label]()

    def new_shown(self) -> dict:
        """A session's record of what its page shows: chart digests and the last valid budget inputs."""
        return {"inputs": {"bits": self.start_bits, "MB": self.start_mb, "act": ACT_RANGE[1], "k": 0.6}}

    # ---- layout --------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        workspace = self.workspace
        with gr.Blocks(title="MixDQ Studio") as demo:
            gr.Markdown(
                "# MixDQ Studio\nMixed-precision quantization of few-step diffusion models "
                "([MixDQ, ECCV 2024](https://arxiv.org/abs/2405.17873)). Loaded model: "
                f"`{workspace.model_id}` on {workspace.device}."
            )
            self.config_state = gr.State(None)
            self.shown_state = gr.State(self.new_shown())
            self.source = gr.Dropdown(self.labels, value=self.labels[0], label="sensitivity data", elem_id="source")
            with gr.Tab("Sensitivity"):
                self._sensitivity_tab()
            with gr.Tab("Budget"):
                self._budget_tab()
            with gr.Tab("Compare"):
                self._compare_tab()
            with gr.Tab("Export / Import"):
                self._export_tab()
            demo.load(self.show_sensitivity, self.view_inputs, self.view_outputs, queue=False, api_name=False).then(
                self.first_allocation, self.alloc_inputs, self.alloc_outputs, preprocess=False, api_name=False
            )
        return demo

    def _sensitivity_tab(self) -> None:
        with gr.Row():
            self.target = gr.Radio(["weights", "activations"], value="weights", label="quantized side")
            self.bit = gr.Radio(["2", "4", "8"], value="4", label="bits")
        self.quality_plot = gr.Plot(label="quality layers (SQNR)")
        self.content_plot = gr.Plot(label="content layers (SSIM)")
        self.worst = gr.Dataframe(label="most sensitive layers at these bits", interactive=False)
        self.view_inputs = [self.source, self.target, self.bit]
        self.view_outputs = [self.quality_plot, self.content_plot, self.worst, self.bit]
        # The sensitivity view is read-only table lookups (~10 ms): no queue, one request instead of two.
        for component in (self.source, self.target, self.bit):
            component.change(self.show_sensitivity, self.view_inputs, self.view_outputs, queue=False, api_name=False)

    def _budget_tab(self) -> None:
        low, high, mb_low, mb_high = _slider_bounds(self.source_of(self.labels[0]))
        band = (
            f"allocations land within ±{BAND:g} bits of the target by design: MixDQ's band, which the integer "
            f"program spends on quality ({services.DEFAULT_BITS:.1f} may give up to "
            f"{services.DEFAULT_BITS + BAND:.2f})"
        )
        with gr.Row():
            self.unit = gr.Radio(list(UNITS), value=UNITS[0], label="budget unit")
            self.budget = gr.Slider(
                low,
                high,
                value=self.start_bits,
                step=BITS_STEP,
                label="weight budget (average bits)",
                info=band,
                elem_id="budget-slider",
            )
            self.budget_mb = gr.Slider(
                mb_low,
                mb_high,
                value=self.start_mb,
                step=MB_STEP,
                label="weight budget (MB of UNet weights)",
                info=band,
                elem_id="budget-mb-slider",
                visible=False,
            )
        with gr.Row():
            self.quantize_acts = gr.Checkbox(value=True, label="quantize activations")
            self.act_bits = gr.Slider(
                *ACT_RANGE,
                value=ACT_RANGE[1],
                step=0.25,
                label="activation budget (average bits over the non-protected layers)",
                elem_id="act-slider",
            )
            self.k_auto = gr.Checkbox(value=True, label="auto K (best content/quality ratio)")
            self.k_value = gr.Slider(
                *K_RANGE,
                value=0.6,
                step=0.01,
                label="K = content bits / quality bits",
                info="used when auto K is off",
                interactive=False,
                elem_id="k-slider",
            )
        self.protected_weights = gr.Radio(
            [(f"{mode}: {help_text}", mode) for mode, help_text in services.PROTECTED_MODES.items()],
            value=services.DEFAULT_PROTECTED,
            label=f"protected layers' weights ({services.PROTECTED_SHARE:.0%} most sensitive layers, activations FP16)",
            info="what the weight budget charges for them; CLI: python -m mixdq allocate --protected-weights",
            elem_id="protected-weights",
        )
        with gr.Row():
            self.weight_scales = gr.Radio(
                list(services.WEIGHT_SCALES),
                value=next(iter(services.WEIGHT_SCALES)),
                label="weight scales (compare and export)",
                info="MSE-clipped: per row, the clip of the min-max scale with the least error; same memory",
            )
            self.fp8 = gr.Checkbox(
                value=False,
                label="A8 linears in FP8 e4m3 (compare and export)",
                info="activations and 8-bit weights; 4/2-bit weights keep their grid. cuBLAS FP8 on Hopper / "
                "Ada GPUs once deployed; another 8-bit grid, simulated here",
            )
        self.budget_notice = gr.Markdown(elem_id="budget-notice")
        self.status = gr.Markdown(elem_id="allocation-status")
        self.allocation_plot = gr.Plot(label="allocation")
        with gr.Row():
            self.memory_bar = gr.HTML(elem_id="memory")
            self.pareto_plot = gr.Plot(label="frontier")

        self.alloc_inputs = [
            self.source,
            self.unit,
            self.budget,
            self.budget_mb,
            self.quantize_acts,
            self.act_bits,
            self.k_auto,
            self.k_value,
            self.shown_state,
            self.protected_weights,
        ]
        self.alloc_outputs = [
            self.allocation_plot,
            self.memory_bar,
            self.pareto_plot,
            self.status,
            self.config_state,
            self.shown_state,
            self.budget,
            self.budget_mb,
            self.act_bits,
            self.k_value,
            self.budget_notice,
        ]
        # preprocess=False: a value typed out of a slider's range reaches the callback, which says what to do.
        events = {"preprocess": False, "show_progress": "hidden"}
        for component in (self.budget, self.budget_mb, self.act_bits, self.k_value):
            # Previews skip the queue (a lookup or a ~10 ms greedy): on a click they usually carry the final view.
            component.input(
                self.preview,
                self.alloc_inputs,
                self.alloc_outputs,
                trigger_mode="always_last",
                queue=False,
                api_name=False,
                **events,
            )
            component.release(
                self.solve,
                self.alloc_inputs,
                self.alloc_outputs,
                trigger_mode="always_last",
                api_name="allocate" if component is self.budget else False,
                **events,
            )
        self.quantize_acts.change(self.solve, self.alloc_inputs, self.alloc_outputs, api_name=False, **events)
        self.k_auto.change(self.k_interactive, [self.k_auto], [self.k_value], queue=False, api_name=False).then(
            self.solve, self.alloc_inputs, self.alloc_outputs, api_name=False, **events
        )
        sliders = [self.budget, self.budget_mb]
        self.unit.change(
            self.switch_unit,
            [self.source, self.unit, *sliders, self.protected_weights],
            sliders,
            preprocess=False,
            api_name=False,
        )
        for component in (self.source, self.protected_weights):  # new feasible range: sliders re-bounded first
            component.change(
                self.reset_sliders, [self.source, self.unit, self.protected_weights], sliders, api_name=False
            ).then(self.solve, self.alloc_inputs, self.alloc_outputs, api_name=False, **events)

    def _compare_tab(self) -> None:
        device = self.workspace.device.type
        with gr.Row():
            self.prompt = gr.Textbox(
                "a large red circle on the left, on a blue background",
                label="prompt",
                info="the text encoders read 77 tokens; a longer prompt is cut, and the page says so",
                scale=3,
            )
            self.preset = gr.Radio(list(PRESETS), value=PRESETS[0], label="quantized config")
        if self.workspace.model_id == EMBEDDED_MODEL_ID:
            from mixdq.tiny.prompts import SHORT_PROMPTS

            gr.Examples(
                [[p] for p in SHORT_PROMPTS],
                [self.prompt],
                label=(
                    "examples: the embedded model draws 1 to 3 coloured circles, squares or triangles, with optional "
                    "size (small, large), place (left, right, top, bottom, center) and background; what a prompt "
                    "leaves open takes its defaults, and the report shows the caption it drew"
                ),
                examples_per_page=8,
            )
        with gr.Row():
            self.seed = gr.Number(0, precision=0, label="seed", info=f"0 to {MAX_SEED:,}")
            self.steps = gr.Slider(
                1, TURBO_SAMPLING.max_steps, value=TURBO_SAMPLING.num_inference_steps, step=1, label="steps"
            )
            self.size = gr.Slider(
                MIN_SIZE,
                MAX_SIZE[device],
                value=self.workspace.default_size(),
                step=SIZE_MULTIPLE,
                label="resolution (px)",
                info=f"a multiple of {SIZE_MULTIPLE}",
            )
        with gr.Row():
            generate = gr.Button("Generate FP vs deployed", variant="primary", elem_id="generate", scale=3)
            self.compiled = gr.Checkbox(
                False,
                label="torch.compile FP16 and deployed (GPU: timed as they would ship; 1-3 min warm-up per config)",
                visible=device == "cuda",
            )
        with gr.Row():
            self.image_slider = gr.ImageSlider(
                label="full precision | deployed (packed weights, kernels)", type="pil", format="png"
            )
            self.simulated = gr.Image(label="fake-quant simulation", type="pil", format="png")
            self.diff = gr.Image(label="|FP − deployed| x4", type="pil", format="png")
        self.compare_notice = gr.Markdown(elem_id="compare-notice")
        self.report = gr.Markdown(elem_id="compare-report")
        generate.click(
            self.compare,
            [
                self.config_state,
                self.preset,
                self.prompt,
                self.seed,
                self.steps,
                self.size,
                self.weight_scales,
                self.fp8,
                self.compiled,
            ],
            [self.image_slider, self.simulated, self.diff, self.report, self.compare_notice],
            api_name="compare",
            concurrency_id="gpu",
            concurrency_limit=1,
            preprocess=False,  # the seed, steps and size as typed: compare checks them and says what to do
        )

    def _export_tab(self) -> None:
        export_button = gr.Button("Export current config", elem_id="export")
        self.files = gr.File(
            label="config JSON and MixDQ yaml (JSON only with MSE scales or FP8)", file_count="multiple"
        )
        self.export_status = gr.Markdown(elem_id="export-status")
        self.upload = gr.File(
            label="load a config: a JSON file, or a MixDQ yaml pair (both files together)",
            file_count="multiple",  # no file_types: the page would drop other files silently; import_files says why
            type="filepath",
            elem_id="upload",
        )
        self.import_status = gr.Markdown(elem_id="import-status")
        checkpoint_button = gr.Button("Save quantized checkpoint", elem_id="save-checkpoint")
        self.checkpoint_file = gr.File(
            label="quantized checkpoint folder (.zip): packed UNet, activation ranges, config, FP16 text encoders "
            "and VAE; mixdq.load_quantized and python app.py --model read the unzipped folder",
            elem_id="checkpoint-file",
        )
        self.checkpoint_status = gr.Markdown(elem_id="checkpoint-status")
        checkpoint_button.click(
            self.save_checkpoint,
            [self.config_state, self.weight_scales, self.fp8],
            [self.checkpoint_file, self.checkpoint_status],
            api_name="save_checkpoint",
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        export_button.click(
            self.export,
            [self.config_state, self.source, self.weight_scales, self.fp8],
            [self.files, self.export_status],
            api_name="export",
        )
        self.upload.upload(
            self.import_files,
            [self.upload, self.source, self.shown_state],
            [
                self.config_state,
                self.import_status,
                self.allocation_plot,
                self.memory_bar,
                self.pareto_plot,
                self.status,
                self.shown_state,
                self.budget,
                self.budget_mb,
                self.budget_notice,
            ],
            api_name="import_config",
            preprocess=False,  # a file of any type reaches import_files, which says what it accepts
        )

    # ---- sensitivity ---------------------------------------------------------------------------------
    @guarded(outputs=4, notice=None)
    def show_sensitivity(self, label: str, target: str, bit: str):
        side = "weight" if target == "weights" else "act"
        bits = WEIGHT_BITS if side == "weight" else ACT_BITS
        bit = int(bit) if str(bit).isdigit() and int(bit) in bits else bits[1]
        source = self.source_of(label)
        quality, content = services.sensitivity_figures(source, side, bit)
        worst = services.most_sensitive(source, side, bit)
        return _plot(quality), _plot(content), worst, gr.update(choices=[str(b) for b in bits], value=str(bit))

    # ---- budget --------------------------------------------------------------------------------------
    @guarded(outputs=2, notice=None)
    def switch_unit(
        self,
        label: str,
        unit: str,
        bits_value: float,
        mb_value: float,
        protected_weights: str = services.DEFAULT_PROTECTED,
    ):
        """Show the slider of the chosen unit, at the budget the other one had (converted as the protected
        weights mode counts them)."""
        source, mode = self.source_of(label), _protected_mode(protected_weights)
        low, high, mb_low, mb_high = _slider_bounds(source, mode)
        if unit == "MB":
            mb = min(max(round(source.bits_to_mb(float(bits_value), mode), 1), mb_low), mb_high)
            return gr.update(visible=False), gr.update(visible=True, value=mb)
        bits = min(max(_on_grid(source.mb_to_bits(float(mb_value), mode), BITS_STEP), low), high)
        return gr.update(visible=True, value=bits), gr.update(visible=False)

    @guarded(outputs=2, notice=None)
    def reset_sliders(self, label: str, unit: str, protected_weights: str = services.DEFAULT_PROTECTED):
        """New source or protected weights mode, new feasible range: both sliders re-bounded, at 4 bits where
        possible."""
        source, mode = self.source_of(label), _protected_mode(protected_weights)
        low, high, mb_low, mb_high = _slider_bounds(source, mode)
        bits = min(max(services.DEFAULT_BITS, low), high)
        return (
            gr.update(minimum=low, maximum=high, value=bits, visible=unit != "MB"),
            gr.update(
                minimum=mb_low,
                maximum=mb_high,
                value=min(max(round(source.bits_to_mb(bits, mode), 1), mb_low), mb_high),
                visible=unit == "MB",
            ),
        )

    @staticmethod
    def k_interactive(k_auto: bool):
        """The K slider moves only when it is used: with auto K off."""
        return gr.update(interactive=not k_auto)

    def preview(self, *args):
        return self.allocate(*args, exact=False)

    def solve(self, *args):
        return self.allocate(*args, exact=True)

    def first_allocation(self, *args):
        try:
            return self.solve(*args)
        finally:
            self.on_first_view()

    @guarded(outputs=11, notice=10)
    def allocate(
        self,
        label,
        unit,
        budget_bits,
        budget_mb,
        quantize_acts,
        act_bits,
        k_auto,
        k_value,
        shown,
        protected_weights=services.DEFAULT_PROTECTED,
        *,
        exact: bool,
    ):
        """The allocation view (outputs: see ``alloc_outputs``). A budget input out of range is refused with a
        message and its box goes back to the last valid value; the allocation shown stays. Outputs the session's
        page already shows exactly are skipped, not re-drawn: a slider click fires the preview and the release at
        once, and both usually find the same result."""
        source, mode = self.source_of(label), _protected_mode(protected_weights)
        shown = shown if isinstance(shown, dict) and "inputs" in shown else self.new_shown()
        skip = gr.skip
        in_mb = unit == "MB"
        low, high, mb_low, mb_high = _slider_bounds(source, mode)
        checks = [
            (
                "MB" if in_mb else "bits",
                budget_mb if in_mb else budget_bits,
                (mb_low, mb_high) if in_mb else (low, high),
            ),
            ("act", act_bits, ACT_RANGE),
            ("k", k_value, K_RANGE),
        ]
        names = {
            "bits": "weight budget (average bits)",
            "MB": "weight budget (MB)",
            "act": "activation budget",
            "k": "K",
        }
        with self._shown_lock:
            last = dict(shown["inputs"])
            for key, value, (lo, hi) in checks:
                number = _number(value)
                if number is None or not lo - 1e-9 <= number <= hi + 1e-9:
                    resets = {k: skip() for k in ("bits", "MB", "act", "k")}
                    resets[key] = gr.update(value=last[key])
                    message = (
                        f"The {names[key]} must be a number from {lo:g} to {hi:g} for this model; "
                        f"{value!r} is not, so the box is back at {last[key]:g} and the allocation is unchanged."
                    )
                    return (skip(),) * 6 + (resets["bits"], resets["MB"], resets["act"], resets["k"], message)
        budget = float(budget_mb if in_mb else budget_bits)
        try:
            view = services.allocate(
                source,
                budget,
                "MB" if in_mb else "bits",
                float(act_bits) if quantize_acts else None,
                "auto" if k_auto else float(k_value),
                exact,
                mode,
            )
        except InfeasibleBudgetError as err:
            raise StudioInputError(services.infeasible_message(err)) from None
        outputs = {"heatmap": _plot(view.figure), "memory": view.memory, "pareto": _plot(view.pareto)}
        outputs["status"] = view.summary
        with self._shown_lock:
            heatmap, memory, pareto, status = (_unless_shown(shown, k, v) for k, v in outputs.items())
            shown["inputs"].update({"MB" if in_mb else "bits": budget, "act": float(act_bits), "k": float(k_value)})
        chosen = skip()
        if view.exact:
            achieved = view.result.weight.average_bits
            counted = "" if mode == services.DEFAULT_PROTECTED else f", protected weights {mode}"
            name = (
                f"allocation for {budget:g} {'MB' if in_mb else 'average bits'} ({achieved:.3f} bits{counted}, {label})"
            )
            chosen = ChosenConfig(view.result.config, name, label)
        below = view.result.below_uniform
        notice = below.message if below is not None else ""
        return heatmap, memory, pareto, status, chosen, shown, skip(), skip(), skip(), skip(), notice

    # ---- compare -------------------------------------------------------------------------------------
    @guarded(outputs=5, notice=4)
    def compare(
        self,
        chosen: ChosenConfig | None,
        preset: str,
        prompt: str,
        seed: Any,
        steps: Any,
        size: Any,
        weight_scales: str = next(iter(services.WEIGHT_SCALES)),
        fp8: bool = False,
        compiled: bool = False,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        """FP, simulated and deployed images (outputs: the image slider, simulation, difference, report, notice)."""
        workspace = self.workspace
        if not isinstance(prompt, str) or not prompt.strip():
            raise StudioInputError("Type a prompt first.")
        seed = _integer(seed, "The seed", 0, MAX_SEED, "type a whole number in that range")
        steps = _integer(steps, "Steps", 1, TURBO_SAMPLING.max_steps, "this few-step sampler takes no more")
        max_size = MAX_SIZE[workspace.device.type]
        size = _integer(size, "The resolution", MIN_SIZE, max_size, f"{max_size} px is this device's limit")
        if size % SIZE_MULTIPLE:
            raise StudioInputError(
                f"The resolution must be a multiple of {SIZE_MULTIPLE} px (the model works on {SIZE_MULTIPLE}x "
                f"smaller latents); {size} px is not: try {size - size % SIZE_MULTIPLE} or "
                f"{size - size % SIZE_MULTIPLE + SIZE_MULTIPLE} px."
            )
        if preset not in PRESETS:
            raise StudioInputError(f"Unknown config {preset!r}; choose one of {list(PRESETS)}.")
        if preset == PRESETS[0]:
            chosen = self._generating_config(chosen)
            config, name = chosen.config, chosen.name
        else:
            weight, act = {PRESETS[1]: (8, 8), PRESETS[2]: (4, 8), PRESETS[3]: (8, None)}[preset]
            config = PrecisionConfig.uniform(workspace.layers, weight, act, model_id=workspace.model_id)
            name = preset
        if not workspace.loaded:
            progress(0, desc="Loading the model (it loads in the background after start-up)...")
        pipe = workspace.wait_for_pipeline()
        config = services.with_run_options(config, workspace.inventory, weight_scales, bool(fp8))
        notice = services.prompt_truncation(pipe.tokenizer, prompt) or ""

        def on_stage(stage: str) -> None:
            progress(0, desc=stage)

        try:
            out = workspace.compare(config, prompt, seed, steps, size, on_stage, bool(compiled))
        except ConfigError as err:
            raise StudioInputError(f"This config does not fit the loaded model: {err}") from None
        report = services.compare_report(out, workspace.device.type, name)
        if notice:
            report += f"  \nnote: {notice}"
        drawn = out["result"].prompt_read
        if drawn != prompt:
            notice = " ".join(n for n in (notice, f"Drawn as '{drawn}'.") if n)
        return (out["fp"], out["quant"]), out["simulated"], out["diff"], report, notice

    def _generating_config(self, chosen: ChosenConfig | None) -> ChosenConfig:
        """The session's config, if the loaded model can generate with it; else one message with the next step."""
        workspace = self.workspace
        own = workspace.source.label if workspace.source is not None else None
        next_step = (
            f"choose '{own}' as the sensitivity data above and set a budget, or pick a uniform preset"
            if own is not None
            else "pick a uniform preset"
        )
        if chosen is None:
            raise StudioInputError(f"No allocation yet: {next_step}, then Generate again.")
        if chosen.config.fingerprint not in (None, workspace.fingerprint):
            raise StudioInputError(
                f"The current allocation ({chosen.name}) is for {chosen.config.model_id or 'another model'}, whose "
                f"weights are not loaded here, so it cannot generate images with {workspace.model_id}: "
                f"{next_step}, then Generate again."
            )
        return chosen

    # ---- export / import -----------------------------------------------------------------------------
    @guarded(outputs=2, notice=1)
    def export(
        self,
        chosen: ChosenConfig | None,
        label: str,
        weight_scales: str = next(iter(services.WEIGHT_SCALES)),
        fp8: bool = False,
    ):
        if chosen is None:
            raise StudioInputError("Nothing to export yet: release the budget slider (or import a config) first.")
        inventory = self.source_of(chosen.label).inventory
        config = services.with_run_options(chosen.config, inventory, weight_scales, bool(fp8))
        paths = services.export_config(config, inventory)
        status = services.config_summary(config, inventory)
        refusal = services.yaml_refusal(config, inventory)
        if refusal:
            status += f"  \nJSON only: {refusal}"
        return [str(p) for p in paths], status

    @guarded(outputs=2, notice=1)
    def save_checkpoint(
        self,
        chosen: ChosenConfig | None,
        weight_scales: str = next(iter(services.WEIGHT_SCALES)),
        fp8: bool = False,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        """A checkpoint of the session's config for the loaded model, as a .zip (outputs: the file, the status)."""
        workspace = self.workspace
        if chosen is None:
            raise StudioInputError("Nothing to save yet: release the budget slider (or import a config) first.")
        if chosen.config.fingerprint not in (None, workspace.fingerprint):
            raise StudioInputError(
                f"The current allocation ({chosen.name}) is for {chosen.config.model_id or 'another model'}, whose "
                f"weights are not loaded here: a checkpoint holds {workspace.model_id}'s weights, so choose its own "
                "sensitivity data above and set a budget first."
            )
        if not workspace.loaded:
            progress(0, desc="Loading the model (it loads in the background after start-up)...")
        workspace.wait_for_pipeline()
        config = services.with_run_options(chosen.config, workspace.inventory, weight_scales, bool(fp8))
        progress(0, desc="calibrating, deploying an unfused copy and writing the checkpoint")
        saved = services.save_checkpoint(workspace, config)
        return str(saved.archive), f"{chosen.name}: " + saved.summary()

    @guarded(outputs=10, notice=1)
    def import_files(self, files: Any, label: str, shown: dict | None = None):
        """Load an uploaded config (one JSON, or a MixDQ yaml pair uploaded together) for the selected source's
        model; it replaces the config Compare and Export use and what the Budget view shows."""
        uploads, names = _uploaded(files)
        if not uploads:
            raise StudioInputError(f"Choose a file first: {IMPORT_RULE}.")
        for name in names:
            if Path(name).suffix.lower() not in IMPORT_SUFFIXES:
                raise StudioInputError(f"{name} is not a config file: {IMPORT_RULE}.")
        if len(uploads) > 2 or (len(uploads) == 2 and any(n.lower().endswith(".json") for n in names)):
            raise StudioInputError(f"{len(uploads)} files ({', '.join(names)}): {IMPORT_RULE}.")
        source = self.source_of(label)
        config, name = self._load_upload(uploads, names, source)
        shown = shown if isinstance(shown, dict) and "inputs" in shown else self.new_shown()
        figure, memory, pareto, summary = services.imported_view(source, config, name)
        low, high, mb_low, mb_high = _slider_bounds(source)
        bits = average_weight_bits(list(source.inventory.layers), config)
        bits = min(max(_on_grid(bits, BITS_STEP), low), high)
        mb = min(max(round(source.bits_to_mb(bits), 1), mb_low), mb_high)
        outputs = {"heatmap": _plot(figure), "memory": memory, "pareto": _plot(pareto), "status": summary}
        with self._shown_lock:
            heatmap, memory, pareto, status = (_unless_shown(shown, k, v) for k, v in outputs.items())
            shown["inputs"].update({"bits": bits, "MB": mb})
        chosen = ChosenConfig(config, f"imported {name}", label)
        message = f"Loaded {name}: " + services.config_summary(config, source.inventory)
        return chosen, message, heatmap, memory, pareto, status, shown, bits, mb, ""

    def _load_upload(self, uploads: list, names: list[str], source: SensitivitySource) -> tuple[PrecisionConfig, str]:
        """The uploaded config, validated for ``source``'s model; errors name the files as the user named them.

        Uploads arrive in separate temporary folders, so a yaml pair is linked into one folder under the user's
        names, where :meth:`PrecisionConfig.load` finds the partner by its name."""
        with tempfile.TemporaryDirectory(prefix="mixdq-import-") as folder:
            links = []
            for upload, name in zip(uploads, names, strict=True):
                link = Path(folder) / name
                if link.exists():
                    raise StudioInputError(f"Two uploads are named {name}: {IMPORT_RULE}.")
                os.symlink(Path(str(upload)).resolve(), link)
                links.append(link)
            if len(links) == 2 and mixdq_yaml_pair(links[0], names[0]) is None:
                raise StudioInputError(f"{names[0]} and {names[1]} are not one MixDQ yaml pair: {IMPORT_RULE}.")
            layers = list(source.inventory.layers)
            try:
                config = PrecisionConfig.load(links[0], layers, name=names[0], model_id=source.model_id)
            except ConfigError:
                other = self._source_accepting(links[0], names[0], source.label)
                if other is not None:
                    raise StudioInputError(
                        f"{names[0]} was made for {other.model_id}: choose '{other.label}' as the sensitivity data "
                        "above, then import it again."
                    ) from None
                raise
        shown_name = " + ".join(names) if len(names) == 2 else names[0]
        return config, shown_name

    def _source_accepting(self, path: Path, name: str, current: str) -> SensitivitySource | None:
        """Another source whose model the config file fits, if one does."""
        for label in self.labels:
            if label == current:
                continue
            other = self.source_of(label)
            try:
                PrecisionConfig.load(path, list(other.inventory.layers), name=name, model_id=other.model_id)
            except ConfigError:
                continue
            return other
        return None


def head_html() -> str:
    """A page-head script that (1) loads plotly.js (4.6 MB, which Gradio fetches only once the first chart's
    data has arrived) while the page boots, so the first heatmap does not wait for it, and (2) skips
    drawing into detached chart divs: on every update Gradio's Plot first re-draws the new figure into the
    old, already removed div, then draws it again into a new one, doubling the cost of each update."""
    assets = Path(gr.__file__).parent / "templates" / "frontend" / "assets"
    chunk = next(iter(sorted(assets.glob("PlotlyPlot-*.js"))), None)
    if chunk is None:  # another Gradio build: no hint, the charts still load and draw as usual
        return ""
    return (
        f'<script>import("./assets/{chunk.name}").then(() => {{'
        " const P = window.Plotly, react = P.react;"
        " P.react = (gd, ...rest) => gd.isConnected ? react.call(P, gd, ...rest) : Promise.resolve(gd); });"
        "</script>"
    )


def _uploaded(files: Any) -> tuple[list[Path], list[str]]:
    """(paths, the names the user gave the files) of an upload: Gradio's raw file data (``preprocess=False``: a
    dict with the cached ``path`` and the ``orig_name``), or plain paths."""
    items = files if isinstance(files, (list, tuple)) else [files] if files else []
    paths, names = [], []
    for item in items:
        if isinstance(item, dict):
            path = Path(str(item.get("path")))
            name = str(item.get("orig_name") or path.name)
        else:
            path = Path(str(item))
            name = path.name
        paths.append(path)
        names.append(Path(name).name or "upload")
    return paths, names


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (a typed box can send anything)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any, what: str, low: int, high: int, why: str) -> int:
    """``value`` as an int in [low, high], or a :class:`StudioInputError` saying the range and ``why``."""
    if isinstance(value, str):
        number = _number(value)
        value = number if number is not None else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = value if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
        raise StudioInputError(f"{what} must be a whole number from {low:,} to {high:,} ({why}); got {shown!r}.")
    return value


def _plot(spec: Spec) -> PlotData:
    """A chart spec as gr.Plot's value, serialized here (no plotly figure object on the way)."""
    return PlotData(type="plotly", plot=to_json(spec))


def _unless_shown(shown: dict, key: str, value: Any) -> Any:
    """``value``, or gr.skip() when ``shown`` says the page already shows exactly it; records it."""
    digest = hash(value.plot if isinstance(value, PlotData) else value)
    if shown.get(key) == digest:
        return gr.skip()
    shown[key] = digest
    return value


def _on_grid(value: float, step: float) -> float:
    """``value`` rounded to the slider grid, where the background solver has precomputed results."""
    return round(round(value / step) * step, _decimals(step))


def _slider_bounds(
    source: SensitivitySource, protected_weights: str = services.DEFAULT_PROTECTED
) -> tuple[float, float, float, float]:
    """(bits low, bits high, MB low, MB high) of the weight-budget sliders for ``source``, bits counted as the
    ``protected_weights`` mode counts them."""
    low, high = source.weight_range_bits(protected_weights)
    return (
        *_inner_range(low, high, BITS_STEP),
        *_inner_range(source.bits_to_mb(low, protected_weights), source.bits_to_mb(high, protected_weights), MB_STEP),
    )


def _protected_mode(value: Any) -> str:
    """The page's protected weights choice, checked (an API call can send anything)."""
    if value not in services.PROTECTED_MODES:
        raise StudioInputError(f"protected weights {value!r} is not one of {list(services.PROTECTED_MODES)}.")
    return value


def _inner_range(low: float, high: float, step: float) -> tuple[float, float]:
    """Slider bounds on the step grid inside the feasible [low, high]: strictly above ``low``; ``high`` itself where
    it is on the grid (8.00 bits with the protected weights outside the budget: every layer at 8)."""
    digits = _decimals(step)
    return round(math.ceil(low / step + 1e-9) * step, digits), round(math.floor(high / step + 1e-9) * step, digits)


def _decimals(step: float) -> int:
    """Decimal places of a slider step (0.05 -> 2): rounding to them removes float noise like 4.050000001."""
    return max(0, -math.floor(math.log10(step)))
