"""The embedded model's evaluation: held-out partial captions, the short prompts, and their grid."""

import json

import numpy as np
from PIL import Image

from mixdq.tiny.data import parse_caption
from mixdq.tiny.evaluate_model import checker_accuracy, held_out_partial, main
from mixdq.tiny.prompts import SHORT_PROMPTS


def test_short_prompts_are_in_the_language_and_partial():
    scenes = [parse_caption(p) for p in SHORT_PROMPTS]
    assert sum(s.is_partial() for s in scenes) == len(SHORT_PROMPTS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def test_held_out_partial_captions_are_fixed_and_partial():
    scenes, captions = held_out_partial(64, objects=2)
    assert (scenes, captions) == held_out_partial(64, objects=2)
    assert all(s.is_partial() and len(s.objects) == 2 for s in scenes)
    assert [parse_caption(c) for c in captions] == scenes
    assert len(set(captions)) == 64


def test_checker_reads_partial_captions_of_rendered_scenes():
    assert checker_accuracy(300, partial=True) >= 0.99


def test_main_reports_partial_and_short_prompt_alignment(tmp_path):
    out, grid = tmp_path / "metrics.json", tmp_path / "short.png"
    main(
        ["--n", "4", "--objects", "1", "--steps", "1", "--checker-n", "20", "--short-seeds", "1"]
        + ["--threads", "1", "--json", str(out), "--short-grid", str(grid)]
    )
    metrics = json.loads(out.read_text())
    for key in ("alignment_1obj_1step", "alignment_partial_1obj_1step", "alignment_short_prompts_4step"):
        assert 0.0 <= metrics[key] <= 1.0
    per_prompt = metrics["alignment_per_short_prompt_4step"]
    assert list(per_prompt) == list(SHORT_PROMPTS)
    assert np.isclose(np.mean(list(per_prompt.values())), metrics["alignment_short_prompts_4step"])
    assert metrics["checker_accuracy_rendered_partial"] >= 0.95
    assert Image.open(grid).size == (2 * 128, len(SHORT_PROMPTS) // 2 * 128)  # one seed: two prompts a row
