"""A CLIP-style byte-level BPE vocabulary for the caption language.

Built like OpenAI CLIP's: the 256 byte characters, their end-of-word forms, then merges, then
the two special tokens. The merges are learned (classic BPE) on the caption words, so every
caption word is one token while any other text still tokenizes (into characters). The same
merges feed the diffusers pipeline's `CLIPTokenizer` and open_clip's `SimpleTokenizer`.
"""

from __future__ import annotations

import gzip
import itertools
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from mixdq.tiny.data import caption_vocabulary

END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (as in OpenAI CLIP's `simple_tokenizer.py`):
    printable Latin-1 bytes map to themselves, the others to code points from 256 up, in CLIP's order.
    Written here so that training and evaluation need no open_clip on a bare GPU machine."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Printable bytes first, in this order: the vocabulary's ids follow the table's order.
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each word into a single token (ties broken alphabetically)."""
    segmented = {w: tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seg in segmented.values() for p in itertools.pairwise(seg))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seg in segmented.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segmented[w] = tuple(out)


def caption_merges() -> list[tuple[str, str]]:
    return learn_merges(caption_vocabulary())


def _vocab(merges: list[tuple[str, str]], specials: tuple[str, str]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + list(specials)
    return {t: i for i, t in enumerate(tokens)}


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """transformers CLIPTokenizer (as in SDXL's `tokenizer` / `tokenizer_2`) for the captions."""
    merges = caption_merges()
    vocab = _vocab(merges, ("<|startoftext|>", "<|endoftext|>"))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def vocab_size() -> int:
    return 2 * 256 + len(caption_merges()) + 2


def write_open_clip_bpe(path: Path) -> None:
    """The merges in open_clip's gzip format (a header line, then 'a b' per line)."""
    lines = ["#version: tiny-captions"] + [f"{a} {b}" for a, b in caption_merges()]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
