"""The studio's layout and event wiring. Every callback is a few lines around :mod:`studio.services`."""

from __future__ import annotations

import math
from collections.abc import Callable

import gradio as gr

from mixdq.allocate import InfeasibleBudgetError
from mixdq.config import ConfigError, PrecisionConfig
from mixdq.models import TURBO_SAMPLING
from studio import services
from studio.services import ModelWorkspace, SensitivitySource

UNITS = ("average bits", "MB")
BITS_STEP = services.BITS_STEP
MB_STEP = 0.1
PRESETS = ("current allocation", "uniform W8A8", "uniform W4A8", "uniform W8A16 (weights only)")
MAX_SIZE = {"cpu": 256, "cuda": 1024}


def build_demo(workspace: ModelWorkspace, sources: dict[str, Callable[[], SensitivitySource]]) -> gr.Blocks:
    """The four views: sensitivity heatmaps, the live budget, FP vs quantized images, export/import."""
    labels = list(sources)
    first = sources[labels[0]]()
    low, high, mb_low, mb_high = _slider_bounds(first)
    start_bits = min(max(4.0, low), high)

    def source_of(label: str) -> SensitivitySource:
        return sources[label]()

    # ---- callbacks ---------------------------------------------------------------------------------
    def show_sensitivity(label, target, bit):
        target = "weight" if target == "weights" else "act"
        bits = (2, 4, 8) if target == "weight" else (4, 8)
        bit = int(bit) if int(bit) in bits else bits[1]
        quality, content = services.sensitivity_figures(source_of(label), target, bit)
        worst = services.most_sensitive(source_of(label), target, bit)
        return quality, content, worst, gr.update(choices=[str(b) for b in bits], value=str(bit))

    def switch_unit(label, unit, bits_value, mb_value):
        """Show the slider of the chosen unit, at the budget the other one had."""
        source = source_of(label)
        low, high, mb_low, mb_high = _slider_bounds(source)
        if unit == "MB":
            mb = min(max(round(source.bits_to_mb(bits_value), 1), mb_low), mb_high)
            return gr.update(visible=False), gr.update(visible=True, value=mb)
        bits = min(max(round(source.mb_to_bits(mb_value), 2), low), high)
        return gr.update(visible=True, value=bits), gr.update(visible=False)

    def reset_sliders(label, unit):
        """New source, new feasible range: both sliders re-bounded, at 4 bits where possible."""
        source = source_of(label)
        low, high, mb_low, mb_high = _slider_bounds(source)
        bits = min(max(4.0, low), high)
        return (
            gr.update(minimum=low, maximum=high, value=bits, visible=unit != "MB"),
            gr.update(
                minimum=mb_low,
                maximum=mb_high,
                value=min(max(round(source.bits_to_mb(bits), 1), mb_low), mb_high),
                visible=unit == "MB",
            ),
        )

    def run_allocation(label, unit, budget_bits, budget_mb, quantize_acts, act_bits, k_auto, k_value, exact):
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
            return gr.update(), gr.update(), gr.update(), services.infeasible_message(err), gr.update()
        pareto = services.pareto_figure(source, view.result.weight.average_bits)
        config = view.result.config.to_dict() if exact else gr.update()
        return view.figure, view.memory, pareto, view.summary, config

    def preview(*args):
        return run_allocation(*args, exact=False)

    def solve(*args):
        return run_allocation(*args, exact=True)

    def export(config_dict, label):
        if not config_dict:
            return None, "Nothing to export yet: release the budget slider (or import a config) first."
        config = PrecisionConfig.from_dict(config_dict)
        inventory = sources_by_model(config.model_id, label).inventory
        paths = services.export_config(config, inventory)
        return [str(p) for p in paths], services.config_summary(config, inventory)

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

    def compare(config_dict, preset, prompt, seed, steps, size, progress=gr.Progress(track_tqdm=True)):
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        if preset == PRESETS[0]:
            if not config_dict:
                raise gr.Error("No allocation yet: set a budget in the Budget view (or pick a uniform preset).")
            config = PrecisionConfig.from_dict(config_dict)
        else:
            weight, act = {PRESETS[1]: (8, 8), PRESETS[2]: (4, 8), PRESETS[3]: (8, None)}[preset]
            config = PrecisionConfig.uniform(workspace.layers, weight, act, model_id=workspace.model_id)
        try:
            out = workspace.compare(config, prompt, int(seed), int(steps), int(size))
        except ConfigError as err:
            raise gr.Error(f"This config does not fit the loaded model: {err}") from None
        m = out["metrics"]
        backend = (
            "CPU reference path (fake-quant simulation)"
            if workspace.device.type == "cpu"
            else "CUDA (fake-quant simulation)"
        )
        fp_name = "FP (computed in FP32 on CPU)" if workspace.device.type == "cpu" else "FP16"
        judged = ""
        if "clip_fp" in m:
            verdict = {
                True: "all attributes right",
                False: "attributes wrong",
                None: "caption not in the model's language",
            }
            judged = (
                f"**CLIP score** (embedded CLIP) FP {m['clip_fp']:.1f} · quantized {m['clip_quant']:.1f} · "
                f"**alignment checker** FP: {verdict[m['aligned_fp']]}, quantized: {verdict[m['aligned_quant']]}  \n"
            )
        report = (
            f"**SSIM** {m['ssim']:.4f} · **PSNR** {m['psnr']:.2f} dB  \n"
            + judged
            + f"**{fp_name}**: {out['fp_seconds']:.2f} s, {out['fp_mb']:,.2f} MB UNet weights in FP16 · "
            f"**quantized**: {out['quant_seconds']:.2f} s, {out['quant_mb']:,.2f} MB "
            f"({out['fp_mb'] / out['quant_mb']:.2f}x smaller)  \n"
            f"quantized image computed on: **{backend}**"
        )
        return (out["fp"], out["quant"]), out["diff"], report

    # ---- layout --------------------------------------------------------------------------------------
    with gr.Blocks(title="MixDQ Studio") as demo:
        gr.Markdown(
            "# MixDQ Studio\nMixed-precision quantization of few-step diffusion models "
            "([MixDQ, ECCV 2024](https://arxiv.org/abs/2405.17873)). Loaded model: "
            f"`{workspace.model_id}` on {workspace.device}."
        )
        config_state = gr.State(None)
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
                    4, 8, value=8, step=0.25, label="activation budget (average bits)", elem_id="act-slider"
                )
                k_auto = gr.Checkbox(value=True, label="auto K (best content/quality ratio)")
                k_value = gr.Slider(0.2, 2.0, value=0.6, step=0.01, label="K = content bits / quality bits")
            status = gr.Markdown(elem_id="allocation-status")
            allocation_plot = gr.Plot(label="allocation")
            with gr.Row():
                memory_plot = gr.Plot(label="memory")
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
            generate = gr.Button("Generate FP vs quantized", variant="primary", elem_id="generate")
            with gr.Row():
                slider = gr.ImageSlider(label="full precision | quantized", type="pil", format="png")
                diff = gr.Image(label="|difference| x4", type="pil", format="png")
            report = gr.Markdown(elem_id="compare-report")
        with gr.Tab("Export / Import"):
            export_button = gr.Button("Export current config", elem_id="export")
            files = gr.File(label="config JSON and MixDQ yaml", file_count="multiple")
            export_status = gr.Markdown()
            upload = gr.File(label="load a config JSON", file_types=[".json"], type="filepath")
            import_status = gr.Markdown()

        # ---- wiring --------------------------------------------------------------------------------------
        view_inputs = [source, target, bit]
        view_outputs = [quality_plot, content_plot, worst, bit]
        for component in (source, target, bit):
            component.change(show_sensitivity, view_inputs, view_outputs, api_name=False)
        alloc_inputs = [source, unit, budget, budget_mb, quantize_acts, act_bits, k_auto, k_value]
        alloc_outputs = [allocation_plot, memory_plot, pareto_plot, status, config_state]
        for component in (budget, budget_mb, act_bits, k_value):
            component.input(
                preview, alloc_inputs, alloc_outputs, show_progress="hidden", trigger_mode="always_last", api_name=False
            )
            api_name = "allocate" if component is budget else False
            component.release(solve, alloc_inputs, alloc_outputs, show_progress="hidden", api_name=api_name)
        for component in (quantize_acts, k_auto):
            component.change(solve, alloc_inputs, alloc_outputs, show_progress="hidden", api_name=False)
        unit.change(switch_unit, [source, unit, budget, budget_mb], [budget, budget_mb], api_name=False)
        source.change(reset_sliders, [source, unit], [budget, budget_mb], api_name=False).then(
            solve, alloc_inputs, alloc_outputs, api_name=False
        )
        generate.click(
            compare,
            [config_state, preset, prompt, seed, steps, size],
            [slider, diff, report],
            api_name="compare",
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        export_button.click(export, [config_state, source], [files, export_status], api_name="export")
        upload.upload(import_file, [upload, source], [config_state, import_status], api_name="import_config")
        demo.load(show_sensitivity, view_inputs, view_outputs, api_name=False).then(
            solve, alloc_inputs, alloc_outputs, api_name=False
        )
    return demo


def _slider_bounds(source: SensitivitySource) -> tuple[float, float, float, float]:
    """(bits low, bits high, MB low, MB high) of the weight-budget sliders for ``source``."""
    low, high = source.weight_range_bits()
    return (
        *_inner_range(low, high, BITS_STEP),
        *_inner_range(source.bits_to_mb(low), source.bits_to_mb(high), MB_STEP),
    )


def _inner_range(low: float, high: float, step: float) -> tuple[float, float]:
    """Slider bounds on the step grid, strictly inside the feasible [low, high]."""
    digits = max(0, -int(math.floor(math.log10(step))))
    return round(math.ceil(low / step + 1e-9) * step, digits), round(math.floor(high / step - 1e-9) * step, digits)
