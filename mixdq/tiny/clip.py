"""The tiny open_clip model shipped in assets/tiny-clip: the CLIP-score / FID-feature model of the
embedded pipeline. It uses the captions' own BPE merges (vocab of 595 tokens instead of 49,408),
so the text tower stays small while any text still tokenizes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file

from mixdq.tiny import CLIP_WEIGHTS_FILE, TINY_CLIP_DIR
from mixdq.tiny.vocab import vocab_size

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = CLIP_WEIGHTS_FILE
BPE_FILE = "bpe_merges.txt.gz"
IMAGE_SIZE = 64


def model_config() -> dict:
    """open_clip model config (the `model_cfg` of open_clip_config.json)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": vocab_size(), "width": 128, "heads": 4, "layers": 4},
    }


def build_model(cfg: dict | None = None) -> open_clip.CLIP:
    cfg = cfg or model_config()
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]),
    )


def build_tokenizer(bpe_path: Path, context_length: int = 77) -> SimpleTokenizer:
    return SimpleTokenizer(bpe_path=str(bpe_path), context_length=context_length)


def load_tiny_clip(path: Path | str = TINY_CLIP_DIR) -> tuple[open_clip.CLIP, Callable, SimpleTokenizer]:
    """(model in eval mode, fp32; image preprocess for PIL images; tokenizer), fully offline."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"no tiny CLIP weights at {path / WEIGHTS_FILE}; train them with `python -m mixdq.tiny.clip_train --out {path}`"
        )
    cfg = json.loads((path / CONFIG_FILE).read_text())
    model = build_model(cfg["model_cfg"])
    model.load_state_dict({k: v.float() for k, v in load_file(path / WEIGHTS_FILE).items()})
    pre = cfg["preprocess_cfg"]
    preprocess = open_clip.image_transform(
        pre["size"], is_train=False, mean=pre["mean"], std=pre["std"], interpolation=pre["interpolation"]
    )
    tokenizer = build_tokenizer(path / BPE_FILE, cfg["model_cfg"]["text_cfg"]["context_length"])
    return model.eval(), preprocess, tokenizer


def preprocess_tensor(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Batched stand-in for the PIL preprocess: (B, 3, H, W) in [0, 1] -> normalized (B, 3, size, size)."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_score(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair 100 * cosine(image, text) for images (B, 3, H, W) in [0, 1] and tokens (B, L)."""
    img = F.normalize(model.encode_image(preprocess_tensor(images)), dim=-1)
    txt = F.normalize(model.encode_text(tokens.to(images.device)), dim=-1)
    return 100 * (img * txt).sum(-1)
