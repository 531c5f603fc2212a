"""The embedded default model: a tiny SDXL-architecture text-to-image pipeline trained on procedural
scenes (data), its CLIP (clip), an exact alignment checker (checker), and their training scripts."""

from pathlib import Path

TINY_CLIP_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-clip"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"  # here, not in clip.py: found without importing open_clip
