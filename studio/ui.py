"""The studio's layout and event wiring. Every callback is a few lines around :mod:`studio.services`."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from mixdq.allocate import InfeasibleBudgetError
from mixdq.config import ConfigError, PrecisionConfig
from mixdq.models import TURBO_SAMPLING, ModelNotAvailableError
from studio import services
from studio.plots import Spec, to_json
from studio.services import ModelWorkspace, SensitivitySource

UNITS = ("average bits", "MB")
BITS_STEP = services.BITS_STEP
MB_STEP = 0.1
PRESETS = ("current allocation", "uniform W8A8", "uniform W4A8", "uniform W8A16 (weights only)")
MAX_SIZE = {"cpu": 256, "cuda": 1024}


def build_demo(
    workspace: ModelWorkspace,
    sources: dict[str, Callable[[], SensitivitySource]],
    on_first_view: Callable[[], None] = lambda: None,
) -> gr.Blocks:
    """The four views: sensitivity heatmaps, the live budget, FP vs quantized images, export/import.
    ``on_first_view`` is called once a page has its first views (background work waits for it)."""
    labels = list(sources)
    first = sources[labels[0]]()
    low, high, mb_low, mb_high = _slider_bounds(first)
    start_bits = min(max(services.DEFAULT_BITS, low), high)

    def source_of(label: str) -> SensitivitySource:
        return sources[label]()

    shown_lock = threading.Lock()

    # ---- callbacks ---------------------------------------------------------------------------------
    def show_sensitivity(label, target, bit):
        target = "weight" if target == "weights" else "act"
        bits = (2, 4, 8) if target == "weight" else (4, 8)
        bit = int(bit) if int(bit) in bits else bits[1]
        quality, content = services.sensitivity_figures(source_of(label), target, bit)
        worst = services.most_sensitive(source_of(label), target, bit)
        return _plot(quality), _plot(content), worst, gr.update(choices=[str(b) for b in bits], value=str(bit))

    def switch_unit(label, unit, bits_value, mb_value):
        """Show the slider of the chosen unit, at the budget the other one had."""
        source = source_of(label)
        low, high, mb_low, mb_high = _slider_bounds(source)
        if unit == "MB":
            mb = min(max(round(source.bits_to_mb(bits_value), 1), mb_low), mb_high)
            return gr.update(visible=False), gr.update(visible=True, value=mb)
        bits = min(max(_on_grid(source.mb_to_bits(mb_value), BITS_STEP), low), high)
        return gr.update(visible=True, value=bits), gr.update(visible=False)

    def reset_sliders(label, unit):
        """New source, new feasible range: both sliders re-bounded, at 4 bits where possible."""
        source = source_of(label)
        low, high, mb_low, mb_high = _slider_bounds(source)
        bits = min(max(services.DEFAULT_BITS, low), high)
        return (
            gr.update(minimum=low, maximum=high, value=bits, visible=unit != "MB"),
            gr.update(
                minimum=mb_low,
                maximum=mb_high,
                value=min(max(round(source.bits_to_mb(bits), 1), mb_low), mb_high),
                visible=unit == "MB",
            ),
        )

    def run_allocation(label, unit, budget_bits, budget_mb, quantize_acts, act_bits, k_auto, k_value, shown, exact):
        """The allocation view. Outputs this session's page already shows exactly are skipped, not re-drawn:
        a slider click fires the preview and the release at once, and both usually find the same result."""
        source = source_of(label)
        budget = budget_mb if unit == "MB" else budget_bits
        try:
            view = services.allocate(
                source,
                float(budget),
                "MB" if unit == "MB" else "bits",
                float(act_bits) if quantize_acts else None,
                "auto" if k_auto else float(k_value),
                exact,
            )
        except InfeasibleBudgetError as err:
            with shown_lock:
                status = _unless_shown(shown, "status", services.infeasible_message(err))
            return gr.skip(), gr.skip(), gr.skip(), status, gr.skip(), shown
        outputs = {"heatmap": _plot(view.figure), "memory": view.memory, "pareto": _plot(view.pareto)}
        outputs["status"] = view.summary
        with shown_lock:  # the session's state dict is shared by its concurrent events: check and record at once
            heatmap, memory, pareto, status = (_unless_shown(shown, key, value) for key, value in outputs.items())
        config = view.result.config.to_dict() if view.exact else gr.skip()
        return heatmap, memory, pareto, status, config, shown

    def preview(*args):
        return run_allocation(*args, exact=False)

    def solve(*args):
        return run_allocation(*args, exact=True)

    def first_allocation(*args):
        try:
            return solve(*args)
        finally:
            on_first_view()

    def export(config_dict, label, weight_scales, fp8):
        if not config_dict:
            return None, "Nothing to export yet: release the budget slider (or import a config) first."
        config = PrecisionConfig.from_dict(config_dict)
        inventory = sources_by_model(config.model_id, label).inventory
        config = services.with_run_options(config, inventory, weight_scales, fp8)
        paths = services.export_config(config, inventory)
        status = services.config_summary(config, inventory)
        refusal = services.yaml_refusal(config, inventory)
        if refusal:
            status += f"  \nJSON only: {refusal}"
        return [str(p) for p in paths], status

    def sources_by_model(model_id, label):
        """The source whose model made a config (a config carries its model id)."""
        for factory in sources.values():
            if factory().model_id == model_id:
                return factory()
        return source_of(label)

    def import_file(file, label):
        if file is None:
            return gr.update(), "Choose a JSON config file first."
        try:
            config = PrecisionConfig.load(file)
            source = sources_by_model(config.model_id, label)
            config.validate(list(source.inventory.layers))
        except ConfigError as err:
            return gr.update(), f"Not loaded: {err}"
        return config.to_dict(), "Loaded. " + services.config_summary(config, source.inventory)

    def compare(
        config_dict,
        preset,
        prompt,
        seed,
        steps,
        size,
        weight_scales,
        fp8,
        compiled=False,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        if not workspace.loaded:
            progress(0, desc="Loading the model (it loads in the background after start-up)...")
        try:
            workspace.wait_for_pipeline()
        except ModelNotAvailableError as err:
            raise gr.Error(str(err)) from None
        if preset == PRESETS[0]:
            if not config_dict:
                raise gr.Error("No allocation yet: set a budget in the Budget view (or pick a uniform preset).")
            config = PrecisionConfig.from_dict(config_dict)
        else:
            weight, act = {PRESETS[1]: (8, 8), PRESETS[2]: (4, 8), PRESETS[3]: (8, None)}[preset]
            config = PrecisionConfig.uniform(workspace.layers, weight, act, model_id=workspace.model_id)
        config = services.with_run_options(config, workspace.inventory, weight_scales, fp8)

        def on_stage(stage: str) -> None:
            progress(0, desc=stage)

        try:
            out = workspace.compare(config, prompt, int(seed), int(steps), int(size), on_stage, bool(compiled))
        except ConfigError as err:
            raise gr.Error(f"This config does not fit the loaded model: {err}") from None
        except services.DeployOutOfMemoryError as err:
            return gr.skip(), gr.skip(), gr.skip(), f"**Not deployed**: {err}"
        report = services.compare_report(out, workspace.device.type)
        return (out["fp"], out["quant"]), out["simulated"], out["diff"], report

    # ---- layout --------------------------------------------------------------------------------------
    with gr.Blocks(title="MixDQ Studio") as demo:
        gr.Markdown(
            "# MixDQ Studio\nMixed-precision quantization of few-step diffusion models "
            "([MixDQ, ECCV 2024](https://arxiv.org/abs/2405.17873)). Loaded model: "
            f"`{workspace.model_id}` on {workspace.device}."
        )
        config_state = gr.State(None)
        shown_state = gr.State({})  # digests of what this session's allocation view shows
        source = gr.Dropdown(labels, value=labels[0], label="sensitivity data", elem_id="source")
        with gr.Tab("Sensitivity"):
            with gr.Row():
                target = gr.Radio(["weights", "activations"], value="weights", label="quantized side")
                bit = gr.Radio(["2", "4", "8"], value="4", label="bits")
            quality_plot = gr.Plot(label="quality layers (SQNR)")
            content_plot = gr.Plot(label="content layers (SSIM)")
            worst = gr.Dataframe(label="most sensitive layers at these bits", interactive=False)
        with gr.Tab("Budget"):
            with gr.Row():
                unit = gr.Radio(list(UNITS), value=UNITS[0], label="budget unit")
                budget = gr.Slider(
                    low,
                    high,
                    value=start_bits,
                    step=BITS_STEP,
                    label="weight budget (average bits)",
                    elem_id="budget-slider",
                )
                budget_mb = gr.Slider(
                    mb_low,
                    mb_high,
                    value=round(first.bits_to_mb(start_bits), 1),
                    step=MB_STEP,
                    label="weight budget (MB of UNet weights)",
                    elem_id="budget-mb-slider",
                    visible=False,
                )
            with gr.Row():
                quantize_acts = gr.Checkbox(value=True, label="quantize activations")
                act_bits = gr.Slider(
                    4,
                    8,
                    value=8,
                    step=0.25,
                    label="activation budget (average bits over the non-protected layers)",
                    elem_id="act-slider",
                )
                k_auto = gr.Checkbox(value=True, label="auto K (best content/quality ratio)")
                k_value = gr.Slider(0.2, 2.0, value=0.6, step=0.01, label="K = content bits / quality bits")
            with gr.Row():
                weight_scales = gr.Radio(
                    list(services.WEIGHT_SCALES),
                    value=next(iter(services.WEIGHT_SCALES)),
                    label="weight scales (compare and export)",
                    info="MSE-clipped: per row, the clip of the min-max scale with the least error; same memory",
                )
                fp8 = gr.Checkbox(
                    value=False,
                    label="A8 linears in FP8 e4m3 (compare and export)",
                    info="activations and 8-bit weights; 4/2-bit weights keep their grid. cuBLAS FP8 on Hopper / "
                    "Ada GPUs once deployed; another 8-bit grid, simulated here",
                )
            status = gr.Markdown(elem_id="allocation-status")
            allocation_plot = gr.Plot(label="allocation")
            with gr.Row():
                memory_bar = gr.HTML(elem_id="memory")
                pareto_plot = gr.Plot(label="frontier")
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox("a large red circle on the left, on a blue background", label="prompt", scale=3)
                preset = gr.Radio(list(PRESETS), value=PRESETS[0], label="quantized config")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed")
                steps = gr.Slider(
                    1, TURBO_SAMPLING.max_steps, value=TURBO_SAMPLING.num_inference_steps, step=1, label="steps"
                )
                size = gr.Slider(
                    64,
                    MAX_SIZE[workspace.device.type],
                    value=workspace.default_size(),
                    step=64,
                    label="resolution (px)",
                )
            with gr.Row():
                generate = gr.Button("Generate FP vs deployed", variant="primary", elem_id="generate", scale=3)
                compiled = gr.Checkbox(
                    False,
                    label="torch.compile FP16 and deployed (GPU: timed as they would ship; 1-3 min warm-up per config)",
                    visible=workspace.device.type == "cuda",
                )
            with gr.Row():
                slider = gr.ImageSlider(
                    label="full precision | deployed (packed weights, kernels)", type="pil", format="png"
                )
                simulated = gr.Image(label="fake-quant simulation", type="pil", format="png")
                diff = gr.Image(label="|FP − deployed| x4", type="pil", format="png")
            report = gr.Markdown(elem_id="compare-report")
        with gr.Tab("Export / Import"):
            export_button = gr.Button("Export current config", elem_id="export")
            files = gr.File(
                label="config JSON and MixDQ yaml (JSON only with MSE scales or FP8)", file_count="multiple"
            )
            export_status = gr.Markdown()
            upload = gr.File(label="load a config JSON", file_types=[".json"], type="filepath")
            import_status = gr.Markdown()

        # ---- wiring --------------------------------------------------------------------------------------
        view_inputs = [source, target, bit]
        view_outputs = [quality_plot, content_plot, worst, bit]
        # The sensitivity view is read-only table lookups (~10 ms): no queue, one request instead of two.
        for component in (source, target, bit):
            component.change(show_sensitivity, view_inputs, view_outputs, queue=False, api_name=False)
        alloc_inputs = [source, unit, budget, budget_mb, quantize_acts, act_bits, k_auto, k_value, shown_state]
        alloc_outputs = [allocation_plot, memory_bar, pareto_plot, status, config_state, shown_state]
        for component in (budget, budget_mb, act_bits, k_value):
            # Previews skip the queue (a lookup or a ~10 ms greedy): on a click they usually carry the final view.
            component.input(
                preview,
                alloc_inputs,
                alloc_outputs,
                show_progress="hidden",
                trigger_mode="always_last",
                queue=False,
                api_name=False,
            )
            api_name = "allocate" if component is budget else False
            component.release(
                solve,
                alloc_inputs,
                alloc_outputs,
                show_progress="hidden",
                trigger_mode="always_last",
                api_name=api_name,
            )
        for component in (quantize_acts, k_auto):
            component.change(solve, alloc_inputs, alloc_outputs, show_progress="hidden", api_name=False)
        unit.change(switch_unit, [source, unit, budget, budget_mb], [budget, budget_mb], api_name=False)
        source.change(reset_sliders, [source, unit], [budget, budget_mb], api_name=False).then(
            solve, alloc_inputs, alloc_outputs, api_name=False
        )
        generate.click(
            compare,
            [config_state, preset, prompt, seed, steps, size, weight_scales, fp8, compiled],
            [slider, simulated, diff, report],
            api_name="compare",
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        export_button.click(
            export, [config_state, source, weight_scales, fp8], [files, export_status], api_name="export"
        )
        upload.upload(import_file, [upload, source], [config_state, import_status], api_name="import_config")
        demo.load(show_sensitivity, view_inputs, view_outputs, queue=False, api_name=False).then(
            first_allocation, alloc_inputs, alloc_outputs, api_name=False
        )
    return demo


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


def _slider_bounds(source: SensitivitySource) -> tuple[float, float, float, float]:
    """(bits low, bits high, MB low, MB high) of the weight-budget sliders for ``source``."""
    low, high = source.weight_range_bits()
    return (
        *_inner_range(low, high, BITS_STEP),
        *_inner_range(source.bits_to_mb(low), source.bits_to_mb(high), MB_STEP),
    )


def _inner_range(low: float, high: float, step: float) -> tuple[float, float]:
    """Slider bounds on the step grid, strictly inside the feasible [low, high]."""
    digits = _decimals(step)
    return round(math.ceil(low / step + 1e-9) * step, digits), round(math.floor(high / step - 1e-9) * step, digits)


def _decimals(step: float) -> int:
    """Decimal places of a slider step (0.05 -> 2): rounding to them removes float noise like 4.050000001."""
    return max(0, -math.floor(math.log10(step)))
