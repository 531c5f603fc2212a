"""The studio's page for a saved quantized checkpoint (``python app.py --model CHECKPOINT_FOLDER``): generate with
it and read its config. The checkpoint holds no FP16 UNet weights, so there is nothing to compare against and no
sensitivity data to re-allocate from: the page says so instead of offering those views."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from mixdq.models import TURBO_SAMPLING, generate_image
from studio import services
from studio.ui import MAX_SEED, MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, StudioInputError, _integer, guarded

NO_FP16 = (
    "This is a quantized checkpoint: its FP16 UNet weights are not in it, so FP16-vs-quantized comparisons, "
    "sensitivity views and re-allocation are unavailable. To re-allocate, open the original model "
    "(`python app.py --model MODEL_ID`)."
)


def checkpoint_summary(pipe, folder: str | Path) -> str:
    """The checkpoint's config in one paragraph (:func:`studio.services.config_summary` of ``unet.mixdq_config``
    over the layers its ``unet/config.json`` describes: the deployed UNet has no FP layers left to list)."""
    from studio.sources import unet_inventory

    inventory = unet_inventory(Path(folder) / "unet" / "config.json")
    config = pipe.unet.mixdq_config
    text = services.config_summary(config, inventory)
    options = services.run_options_text(config)
    return text + (f"; run options: {options}" if options else "")


def generate(pipe, prompt: str, seed: int, steps: int, size: int):
    """One image from the checkpoint's pipeline, called as ``mixdq generate --config CHECKPOINT`` calls it (the
    prompt read as :func:`mixdq.models.read_prompt` reads it); returns (image, the prompt the pipeline got)."""
    image, reading = generate_image(pipe, prompt, seed, steps, size)
    return image, reading.text


class CheckpointPage:
    """Generate view and config summary of one loaded checkpoint pipeline (from :func:`mixdq.load_quantized`)."""

    def __init__(self, pipe, folder: str | Path) -> None:
        self.pipe = pipe
        self.folder = Path(folder)
        self.device = pipe.unet.device.type
        self.default_size = pipe.default_sample_size * pipe.vae_scale_factor

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="MixDQ Studio (checkpoint)") as demo:
            gr.Markdown(
                f"# MixDQ Studio\nQuantized checkpoint `{self.folder}` (made from `{self.pipe.model_id or 'model'}`) "
                f"on {self.device}."
            )
            gr.Markdown(NO_FP16, elem_id="checkpoint-notice")
            gr.Markdown(f"**config**: {checkpoint_summary(self.pipe, self.folder)}", elem_id="checkpoint-config")
            with gr.Row():
                self.prompt = gr.Textbox("a large red circle on the left, on a blue background", label="prompt")
                self.seed = gr.Number(0, precision=0, label="seed", info=f"0 to {MAX_SEED:,}")
                self.steps = gr.Slider(
                    1, TURBO_SAMPLING.max_steps, value=TURBO_SAMPLING.num_inference_steps, step=1, label="steps"
                )
                self.size = gr.Slider(
                    MIN_SIZE,
                    MAX_SIZE[self.device],
                    value=self.default_size,
                    step=SIZE_MULTIPLE,
                    label="resolution (px)",
                )
            button = gr.Button("Generate with the checkpoint", variant="primary", elem_id="generate")
            self.image = gr.Image(label="quantized checkpoint", type="pil", format="png")
            self.notice = gr.Markdown(elem_id="generate-notice")
            button.click(
                self.generate,
                [self.prompt, self.seed, self.steps, self.size],
                [self.image, self.notice],
                api_name="generate",
                concurrency_limit=1,
                preprocess=False,
            )
        return demo

    @guarded(outputs=2, notice=1)
    def generate(self, prompt: str, seed: Any, steps: Any, size: Any, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """(image, notice) for the typed inputs; a bad input is one line and the image stays."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise StudioInputError("Type a prompt first.")
        seed = _integer(seed, "The seed", 0, MAX_SEED, "type a whole number in that range")
        steps = _integer(steps, "Steps", 1, TURBO_SAMPLING.max_steps, "this few-step sampler takes no more")
        max_size = MAX_SIZE[self.device]
        size = _integer(size, "The resolution", MIN_SIZE, max_size, f"{max_size} px is this device's limit")
        if size % SIZE_MULTIPLE:
            raise StudioInputError(f"The resolution must be a multiple of {SIZE_MULTIPLE} px; {size} px is not.")
        image, drawn = generate(self.pipe, prompt, seed, steps, size)
        notice = services.prompt_truncation(self.pipe.tokenizer, prompt) or ""
        if drawn != prompt:
            notice = " ".join(n for n in (notice, f"Drawn as '{drawn}'.") if n)
        return image, notice


def build_checkpoint_demo(pipe, folder: str | Path) -> gr.Blocks:
    """The page of a loaded checkpoint (see :class:`CheckpointPage`)."""
    return CheckpointPage(pipe, folder).build()
