"""The procedural dataset: captions say exactly what is drawn, deterministically from a seed."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from mixdq.tiny.data import (
    BACKGROUND_FORMS,
    COLORS,
    MAX_OBJECTS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    Scene,
    SceneObject,
    caption_mix,
    describe,
    parse_caption,
    partial_captions,
    render,
    sample_scenes,
    write_caption,
)
from mixdq.tiny.vocab import build_clip_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-sdxl"


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


@pytest.mark.parametrize(
    "caption",
    ["a photo of a cat", "red background", "a circle", "a red circle on a blue background on a white background", ""],
)
def test_unknown_language_is_a_clear_error(caption):
    with pytest.raises(ValueError, match="not in the tiny dataset's language"):
        parse_caption(caption)


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a red circle on a red background", "colour 'red' twice"),
        ("a red circle on the left and a blue box left", "position 'left' twice"),
        ("a red circle, a blue box, a green disc and a white square", "names 4 objects"),
    ],
)
def test_undrawable_caption_is_a_clear_error(caption, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(caption)


def test_every_written_caption_parses_back_to_its_attributes():
    rng = np.random.default_rng(5)
    scenes = sample_scenes(3000, rng).scenes
    forms = set()
    for scene in scenes:
        described = describe(scene, rng)
        caption = write_caption(described, rng)
        assert parse_caption(caption) == described, caption
        assert parse_caption(described.caption()) == described
        assert described.matches(scene)
        forms.add(_form(caption, described))
    # Every synonym, position phrasing and background form occurs, each alone and with others.
    words = " ".join(forms)
    for phrasings in (*SHAPE_WORDS.values(), *SIZE_WORDS.values(), *POSITION_WORDS.values()):
        for phrase in phrasings:
            assert f" {phrase} " in f" {words} ", phrase
    assert len(forms) > 500


def _form(caption: str, scene: Scene) -> str:
    """The caption with its colours replaced, to count distinct phrasings."""
    for color in COLORS:
        caption = caption.replace(color, "C")
    return caption


def test_written_captions_use_every_background_form_and_place():
    rng = np.random.default_rng(6)
    scene = Scene((SceneObject("circle", "red", "large", "center"),), "white")
    captions = {write_caption(scene, rng) for _ in range(400)}
    assert any(c.startswith("on a white background, ") for c in captions)
    assert any(c.startswith("white background, ") for c in captions)
    assert any(c.endswith(" on a white background") and ", on" not in c for c in captions)
    assert any(c.endswith(", white background") for c in captions)
    assert any(c.endswith(" on white") for c in captions)
    assert len(BACKGROUND_FORMS) == 3


def test_partial_captions_leave_something_open_and_match_their_scene():
    rng = np.random.default_rng(8)
    scenes = sample_scenes(300, rng).scenes
    described, captions = partial_captions(scenes, rng)
    assert all(d.is_partial() for d in described)
    assert all(parse_caption(c) == d and d.matches(s) for c, d, s in zip(captions, described, scenes))
    one = [d for d in described if len(d.objects) == 1]
    # Each attribute is open in about half of them (KEEP_PROB, conditioned on at least one open: 4/7).
    for share in (
        np.mean([d.background is None for d in one]),
        np.mean([d.objects[0].size is None for d in one]),
        np.mean([d.objects[0].position is None for d in one]),
    ):
        assert 0.45 < share < 0.70


def test_caption_mix_keeps_the_full_share():
    rng = np.random.default_rng(9)
    scenes = sample_scenes(2000, rng).scenes
    captions = caption_mix(scenes, rng, full_share=0.45)
    full = np.mean([c == s.caption() for c, s in zip(captions, scenes)])
    assert 0.45 <= full < 0.45 + 0.06  # rephrased descriptions that happen to equal the canonical caption add a few
    assert caption_mix(scenes[:50], rng, full_share=1.0) == [s.caption() for s in scenes[:50]]


def test_full_scene_matches_only_itself():
    scene = Scene(
        (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "small", "top")), "white"
    )
    assert scene.matches(Scene(scene.objects[::-1], "white"))
    assert not scene.matches(Scene(scene.objects, "black"))
    assert not scene.matches(Scene(scene.objects[:1], "white"))
    assert not scene.matches(Scene((scene.objects[0], SceneObject("square", "blue", "large", "top")), "white"))
    short = Scene((SceneObject("circle", "red", None, None),), None)
    assert short.matches(Scene((SceneObject("circle", "red", "small", "bottom"),), "green"))
    assert not short.matches(Scene((SceneObject("square", "red", "small", "bottom"),), "green"))
    assert not short.matches(scene)  # a second object is not what "a red circle" asks for


def test_built_tokenizer_is_the_shipped_one():
    # The shipped text encoders embed exactly these ids: the synonyms must not add a word to caption_vocabulary().
    shipped = CLIPTokenizer.from_pretrained(ASSETS / "tokenizer", local_files_only=True)
    built = build_clip_tokenizer()
    assert built.get_vocab() == shipped.get_vocab() and len(built) == 596
    caption = "big purple disc on the left side and a box in the middle, white background"
    assert built.tokenize(caption) == shipped.tokenize(caption)


def test_new_synonyms_tokenize_into_known_pieces():
    tokenizer = build_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    for word in ("disc", "box", "big", "side", "middle"):
        pieces = tokenizer.tokenize(word)
        assert len(pieces) > 1 and all(p in vocab for p in pieces), (word, pieces)
        assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)


def test_bytes_to_unicode_is_clips_table():
    """Our copy of the byte table must equal open_clip's, or the shipped tokenizer would read text differently."""
    from open_clip.tokenizer import bytes_to_unicode as open_clip_table

    from mixdq.tiny.vocab import bytes_to_unicode

    ours = bytes_to_unicode()
    assert list(ours.items()) == list(open_clip_table().items())  # order too: it fixes the token ids
    assert len(set(ours.values())) == 256 and ours[ord("a")] == "a" and ours[ord(" ")] == "Ġ"


def test_complete_fills_open_attributes_with_the_defaults():
    from mixdq.tiny.data import Scene, SceneObject, complete

    one = complete(parse_caption("a red circle"))
    assert one == Scene((SceneObject("circle", "red", "large", "center"),), "white")
    two = complete(parse_caption("a white disc and a small blue box on the left"))
    # the named place is taken, so the open object takes the next default; white is used, so black
    assert two == Scene(
        (SceneObject("circle", "white", "large", "right"), SceneObject("square", "blue", "small", "left")), "black"
    )
    full = parse_caption("a small red circle on the left, on a green background")
    assert complete(full) == full


def test_training_pairs_draw_what_each_caption_says():
    from mixdq.tiny.data import training_pairs

    scenes = sample_scenes(300, np.random.default_rng(1)).scenes
    drawn, captions = training_pairs(scenes, np.random.default_rng(2), full_share=0.5, open_attributes="default")
    partial = [(d, c) for d, c in zip(drawn, captions) if parse_caption(c).is_partial()]
    assert 100 < len(partial) < 200  # about half the captions are partial
    for d, c in zip(drawn, captions):
        assert not d.is_partial() and parse_caption(c).matches(d)
    assert sum(d != s for d, s in zip(drawn, scenes)) > 100  # defaults replaced random attributes
    same, _ = training_pairs(scenes, np.random.default_rng(2), full_share=0.5, open_attributes="random")
    assert same == scenes  # "random" draws the scenes as given
    with pytest.raises(ValueError, match="open_attributes"):
        training_pairs(scenes, np.random.default_rng(2), 0.5, open_attributes="mean")
