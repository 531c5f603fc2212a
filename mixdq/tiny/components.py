"""Configs and builders of the tiny SDXL-architecture pipeline (random init; `train` fills the weights).

The layout mirrors SDXL-Turbo at a small scale, so MixDQ sees the same module names:
two CLIP text encoders whose penultimate hidden states are concatenated (cross-attention width
64 + 128), a pooled projection feeding the `text_time` add-embedding, a 3-level UNet
(DownBlock2D, 2 x CrossAttnDownBlock2D, mid cross-attn, mirrored up blocks) with linear
projections and attn1/attn2/ff transformer blocks, a 4-channel VAE (f = 4, so 128 px images
have 32 x 32 latents) and SDXL-Turbo's Euler-ancestral trailing scheduler.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mixdq.models import turbo_scheduler_kwargs
from mixdq.tiny.vocab import build_clip_tokenizer, vocab_size

IMAGE_SIZE = 128
VAE_SCALE = 4
LATENT_CHANNELS = 4
TEXT_WIDTHS = (64, 128)  # text_encoder, text_encoder_2 (SDXL: 768, 1280)
POOLED_DIM = 128  # text_encoder_2 projection_dim (SDXL: 1280)
TIME_EMBED_DIM = 16  # addition_time_embed_dim (SDXL: 256)


def build_text_encoder(width: int, tokenizer: CLIPTokenizer, projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_SCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 4),  # diffusers reads this as the number of heads: 32 channels each
        cross_attention_dim=sum(TEXT_WIDTHS),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        norm_num_groups=32,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        force_upcast=False,
    )


def build_scheduler() -> EulerAncestralDiscreteScheduler:
    """SDXL-Turbo's scheduler; the model is trained for v-prediction."""
    return EulerAncestralDiscreteScheduler(**turbo_scheduler_kwargs(), prediction_type="v_prediction")


def build_pipeline() -> StableDiffusionXLPipeline:
    """A randomly initialised pipeline with the shipped architecture."""
    tokenizer = build_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(TEXT_WIDTHS[0], tokenizer, projection=False),
        text_encoder_2=build_text_encoder(TEXT_WIDTHS[1], tokenizer, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        unet=build_unet(),
        scheduler=build_scheduler(),
        add_watermarker=False,
    )
