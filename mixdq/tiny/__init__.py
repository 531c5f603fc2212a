"""The embedded default model: a tiny SDXL-architecture text-to-image pipeline trained on procedural
scenes (data), its CLIP (clip), an exact alignment checker (checker), and their training scripts."""
