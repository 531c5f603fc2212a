"""The shipped embedded model loads offline in SDXL's pipeline format and draws what it is told."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from mixdq.tiny.checker import check
from mixdq.tiny.clip import TINY_CLIP_DIR, clip_score, load_tiny_clip
from mixdq.tiny.data import layout, parse_caption, render

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-sdxl"
CAPTION = "a large red circle in the center, on a white background"
CONTENT_SUFFIXES = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(ASSETS, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_in_fp32_with_sdxl_turbo_scheduler(pipe):
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.beta_schedule) == ("trailing", 1, "scaled_linear")


def test_unet_has_sdxl_module_names(pipe):
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in layers
    assert "up_blocks.0.resnets.0.conv_shortcut" in layers
    assert "add_embedding.linear_1" in layers
    content = [n for n in layers if n.endswith(CONTENT_SUFFIXES)]
    assert (len(layers), len(content)) == (264, 102)  # the model card's counts


def test_red_circle_is_drawn(pipe):
    generator = torch.Generator().manual_seed(0)
    image = pipe(CAPTION, num_inference_steps=4, guidance_scale=0.0, generator=generator, output_type="pt").images[0]
    assert image.shape == (3, 128, 128)
    center = image[:, 54:74, 54:74].mean((1, 2))
    assert center[0] > 0.6 and center[1] < 0.35 and center[2] < 0.35, f"centre is not red: {center}"
    assert check(image, CAPTION).correct


def test_tiny_clip_prefers_the_right_caption():
    model, _, tokenizer = load_tiny_clip(TINY_CLIP_DIR)
    images = render(layout([parse_caption(CAPTION)]))
    wrong = CAPTION.replace("red", "blue")
    scores = clip_score(model, images.expand(2, -1, -1, -1), tokenizer([CAPTION, wrong]))
    assert scores[0] > scores[1]
