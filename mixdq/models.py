"""Load an SDXL-architecture text-to-image pipeline: the embedded default model, a hub id or a folder.

Every model goes through diffusers' ``StableDiffusionXLPipeline.from_pretrained`` so the embedded
model and ``stabilityai/sdxl-turbo`` share one code path. :func:`build_random_pipeline` builds a
small SDXL-architecture pipeline from configs alone (random weights) for tests and offline demos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS_DIR / "tiny-sdxl"
EMBEDDED_MODEL_ID = "mixdq-studio/tiny-sdxl"
# A model folder may declare the caption language its model was trained on (the embedded model does):
# typed prompts are then read into that language's full captions before they reach the text encoders.
PROMPT_LANGUAGE_FILE = "mixdq_prompt_language.json"
TINY_SCENE_LANGUAGE = "mixdq-tiny-scenes"


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says what to do."""


@dataclass(frozen=True)
class SamplingDefaults:
    """SDXL-Turbo-style few-step sampling: 1–4 steps, no classifier-free guidance."""

    num_inference_steps: int = 4
    guidance_scale: float = 0.0
    max_steps: int = 4


TURBO_SAMPLING = SamplingDefaults()


def turbo_scheduler_kwargs() -> dict:
    """EulerAncestral with trailing timesteps, as SDXL-Turbo ships it."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
        "num_train_timesteps": 1000,
    }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed draws the same starting noise whatever device the pipeline runs on."""
    return torch.Generator("cpu").manual_seed(seed)


def sample(
    pipe,
    prompt: str | list[str],
    *,
    generator: torch.Generator | list[torch.Generator],
    steps: int,
    height: int,
    width: int,
    output_type: str = "pil",
    **kwargs,
) -> list | torch.Tensor:
    """The pipeline's images for ``prompt``, sampled Turbo-style (no guidance unless ``kwargs`` sets it).

    Every stage (generate, calibrate, evaluate, benchmark) samples through here, so one seed means the same
    image in each of them.
    """
    kwargs.setdefault("guidance_scale", TURBO_SAMPLING.guidance_scale)
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=generator,
        output_type=output_type,
        **kwargs,
    ).images


def load_pipeline(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """A diffusers ``StableDiffusionXLPipeline``.

    ``None`` loads the embedded model shipped in ``assets/tiny-sdxl``; a local folder or a hub id
    (e.g. ``stabilityai/sdxl-turbo``) loads through ``from_pretrained``. ``dtype`` defaults to FP16
    on CUDA and FP32 on CPU.
    """
    from diffusers import StableDiffusionXLPipeline

    device = torch.device(device or default_device())
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = Path(name_or_path) if name_or_path is not None else EMBEDDED_MODEL_DIR
    if name_or_path is None and not EMBEDDED_MODEL_DIR.is_dir():
        raise ModelNotAvailableError(
            f"The embedded model is missing from {EMBEDDED_MODEL_DIR}; reinstall from a full checkout "
            "(git lfs is not needed) or pass --model with a hub id or a local folder."
        )
    is_local = source.is_dir()
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(source) if is_local else str(name_or_path),
            dtype=dtype,
            local_files_only=is_local or _offline(),
            add_watermarker=False,
        )
    except (OSError, ValueError) as err:
        if is_local:
            raise ModelNotAvailableError(
                f"{source} is not a diffusers StableDiffusionXLPipeline folder ({_first_line(err)}); "
                "pass the folder that holds model_index.json."
            ) from err
        raise ModelNotAvailableError(
            f"Model {name_or_path!r} is not available offline; download it once with "
            f"`huggingface-cli download {name_or_path}` (or pass a local folder) and retry."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = EMBEDDED_MODEL_ID if name_or_path is None else str(name_or_path)
    pipe.prompt_language = prompt_language(source) if is_local else None
    return pipe.to(device)


def prompt_language(folder: Path) -> str | None:
    """The caption language a model folder declares in :data:`PROMPT_LANGUAGE_FILE`, or None."""
    from mixdq.config_io import parse_json, read_text

    path = folder / PROMPT_LANGUAGE_FILE
    if not path.is_file():
        return None
    data = parse_json(read_text(path, path.name, "prompt language"), path.name)
    language = data.get("language") if isinstance(data, dict) else None
    if language != TINY_SCENE_LANGUAGE:
        raise ModelNotAvailableError(
            f"{path} declares the prompt language {language!r}; this version knows only {TINY_SCENE_LANGUAGE!r}."
        )
    return language


@dataclass(frozen=True)
class PromptReading:
    """A typed prompt and the text the pipeline is given for it, with a line for the user when they differ."""

    typed: str
    text: str
    note: str = ""


def read_prompt(pipe, prompt: str) -> PromptReading:
    """What ``pipe`` should be given for ``prompt``.

    A model with a declared caption language (the embedded model) was trained on full captions; a short prompt
    ("a red circle") is read as the full caption with what it leaves open at the language's defaults, so the
    image follows the prompt instead of the model guessing. Any other model gets the prompt as typed."""
    if getattr(pipe, "prompt_language", None) != TINY_SCENE_LANGUAGE:
        return PromptReading(prompt, prompt)
    from mixdq.tiny.data import complete, example_scene, parse_caption

    try:
        described = parse_caption(prompt)
    except ValueError:
        return PromptReading(
            prompt,
            prompt,
            "The embedded model draws 1 to 3 coloured circles, squares or triangles, e.g. "
            f"'a red circle on the left' or '{example_scene().caption()}'; this prompt is outside that language, "
            "so the image will not follow it.",
        )
    text = complete(described).caption()
    if _words(text) == _words(prompt):
        return PromptReading(prompt, text)
    if not described.is_partial():
        return PromptReading(prompt, text, f"Read as '{text}', the embedded model's wording of it.")
    return PromptReading(
        prompt,
        text,
        f"Drawn as '{text}': the embedded model fills what a prompt leaves open with its defaults "
        "(large; centre, or left and right; a white background unless an object is white).",
    )


def generate_image(pipe, prompt: str, seed: int, steps: int, size: int):
    """One image of ``prompt`` as :func:`read_prompt` reads it, from noise ``seed``, and that reading: what
    ``mixdq generate`` and the studio's checkpoint page make."""
    reading = read_prompt(pipe, prompt)
    image = sample(pipe, reading.text, generator=seeded_generator(seed), steps=steps, height=size, width=size)[0]
    return image, reading


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " ").removesuffix(".").split()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def build_random_pipeline(seed: int = 0, sample_size: int = 16, dtype: torch.dtype = torch.float32):
    """A small SDXL-architecture pipeline built from configs with random weights (no files needed).

    Same module names as SDXL (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ...):
    3 down / mid / 3 up blocks, cross-attention transformer blocks, ``text_time`` added embedding,
    two CLIP text encoders (hidden 32 + 32 = cross_attention_dim 64) and a 3-downsample VAE.
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=0.13025,
    )
    tokenizer = _byte_level_clip_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**turbo_scheduler_kwargs()),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = f"random-tiny-sdxl(seed={seed})"
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SDXL_UNET_CONFIG = ASSETS_DIR / "sdxl-turbo" / "unet_config.json"
# SDXL's two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers) and its VAE, as in
# stabilityai/sdxl-turbo's config files: the architecture is what costs time and memory, not the weights.
SDXL_TEXT_ENCODERS = (
    {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "hidden_act": "gelu",
    },
)
SDXL_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
CLIP_VOCAB_SIZE = 49408


def build_sdxl_random_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0):
    """A full-size SDXL(-Turbo)-architecture pipeline with random weights (3.5 B parameters), made on ``device``.

    For measuring time and memory where the real weights are not available: the UNet from SDXL-Turbo's config
    (``assets/sdxl-turbo/unet_config.json``), both text encoders and the VAE at SDXL's sizes, SDXL-Turbo's
    scheduler. The tokenizer is byte-level (no vocabulary files), so any prompt tokenizes.
    """
    import json

    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _byte_level_clip_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(json.loads(SDXL_UNET_CONFIG.read_text()))
        encoders = [
            kind(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, **ids, **config))
            for kind, config in zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_ENCODERS, strict=True)
        ]
        vae = AutoencoderKL(**SDXL_VAE)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**turbo_scheduler_kwargs()),
        add_watermarker=False,
    ).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = f"random-sdxl(seed={seed})"
    return pipe


def _byte_level_clip_tokenizer():
    """A CLIP BPE tokenizer over single bytes (no merges): every string tokenizes, no files needed."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols
