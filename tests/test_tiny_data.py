"""The procedural dataset: captions say exactly what is drawn, deterministically from a seed."""

import numpy as np
import pytest
import torch

from mixdq.tiny.data import COLORS, MAX_OBJECTS, parse_caption, render, sample_scenes
from mixdq.tiny.vocab import build_clip_tokenizer


@pytest.fixture(scope="module")
def batch():
    return sample_scenes(64, np.random.default_rng(7))


def test_captions_parse_back_to_their_attributes(batch):
    for scene, caption in zip(batch.scenes, batch.captions()):
        assert parse_caption(caption) == scene


def test_layout_matches_attributes(batch):
    for b, scene in enumerate(batch.scenes):
        assert 1 <= len(scene.objects) <= MAX_OBJECTS
        colors = [o.color for o in scene.objects] + [scene.background]
        assert len(set(colors)) == len(colors), "object and background colours are distinct"
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert (batch.shape[b] >= 0).sum() == len(scene.objects)
        np.testing.assert_allclose(batch.background[b], COLORS[scene.background])


def test_same_seed_same_scenes_and_images():
    a, b = sample_scenes(8, np.random.default_rng(3)), sample_scenes(8, np.random.default_rng(3))
    assert a.captions() == b.captions()
    assert torch.equal(render(a, 64), render(b, 64))


def test_render_draws_background_and_objects(batch):
    images = render(batch, 128)
    assert images.shape == (64, 3, 128, 128) and 0 <= images.min() and images.max() <= 1
    corner = images[:, :, 0, 0]
    torch.testing.assert_close(corner, torch.as_tensor(batch.background))
    for b, scene in enumerate(batch.scenes):
        obj = scene.objects[0]
        cx, cy = (batch.center[b, 0] * 128).astype(int)
        torch.testing.assert_close(images[b, :, cy, cx], torch.tensor(COLORS[obj.color]))


def test_every_caption_word_is_one_token(batch):
    tokenizer = build_clip_tokenizer()
    caption = batch.captions()[0]
    tokens = tokenizer.tokenize(caption)
    assert [t.removesuffix("</w>") for t in tokens] == caption.replace(",", " ,").split()


def test_unknown_language_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the tiny dataset's language"):
        parse_caption("a photo of a cat")
