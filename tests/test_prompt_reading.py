"""Short prompts on the embedded model: read into the full caption the model was trained on (issue #25)."""

import json

import pytest
import torch

from mixdq.config import PrecisionConfig
from mixdq.evaluate.compare import compare
from mixdq.inventory import layer_inventory
from mixdq.models import (
    EMBEDDED_MODEL_DIR,
    PROMPT_LANGUAGE_FILE,
    TINY_SCENE_LANGUAGE,
    ModelNotAvailableError,
    prompt_language,
    read_prompt,
)


class _Scenes:
    prompt_language = TINY_SCENE_LANGUAGE


@pytest.mark.parametrize(
    ("typed", "read"),
    [
        ("a red circle", "a large red circle in the center, on a white background"),
        ("a small blue box", "a small blue square in the center, on a white background"),
        (
            "a red circle and a blue square",
            "a large red circle on the left and a large blue square on the right, on a white background",
        ),
        ("a green triangle on the right and a red circle", None),  # the named place is kept, the other is free
        ("a white disc", "a large white circle in the center, on a black background"),  # white object: black ground
        ("on yellow, an orange triangle at the top", "a large orange triangle at the top, on a yellow background"),
    ],
)
def test_short_prompts_read_as_full_captions_with_the_defaults(typed, read):
    reading = read_prompt(_Scenes(), typed)
    if read is None:
        assert (
            reading.text
            == "a large green triangle on the right and a large red circle on the left, on a white background"
        )
    else:
        assert reading.text == read
    assert reading.typed == typed and reading.note.startswith(f"Drawn as '{reading.text}'")


def test_full_captions_pass_unchanged_and_synonyms_are_reworded():
    full = "a large red circle in the center, on a white background"
    for typed in (full, full + ".", full.replace(",", "")):
        assert read_prompt(_Scenes(), typed).text == full and read_prompt(_Scenes(), typed).note == ""
    reworded = read_prompt(_Scenes(), "a big red disc in the middle on a white background")
    assert reworded.text == full and reworded.note.startswith("Read as")


def test_prompts_outside_the_language_pass_as_typed_with_a_note():
    reading = read_prompt(_Scenes(), "a photo of a cat")
    assert reading.text == "a photo of a cat"
    assert "outside that language" in reading.note and "circles, squares or triangles" in reading.note


def test_only_models_that_declare_the_language_are_read(random_pipe):
    assert prompt_language(EMBEDDED_MODEL_DIR) == TINY_SCENE_LANGUAGE
    assert read_prompt(random_pipe, "a red circle").text == "a red circle"  # no declaration: as typed


def test_an_unknown_language_is_refused_in_one_line(tmp_path):
    (tmp_path / PROMPT_LANGUAGE_FILE).write_text(json.dumps({"language": "klingon"}))
    with pytest.raises(ModelNotAvailableError, match="'klingon'.*knows only 'mixdq-tiny-scenes'"):
        prompt_language(tmp_path)


def test_compare_gives_the_pipeline_the_read_caption_and_says_so(fresh_random_pipe):
    from mixdq.deploy.runner import DeployedRunner

    fresh_random_pipe.prompt_language = TINY_SCENE_LANGUAGE
    config = PrecisionConfig.uniform(layer_inventory(fresh_random_pipe.unet), 8, None)
    given = []
    encode = fresh_random_pipe.encode_prompt

    def spy(prompt, *args, **kwargs):
        given.append(prompt)
        return encode(prompt, *args, **kwargs)

    fresh_random_pipe.encode_prompt = spy
    result = compare(DeployedRunner(fresh_random_pipe), config, None, "a red circle", 1, 1, 64)
    caption = "a large red circle in the center, on a white background"
    assert result.prompt == "a red circle" and result.prompt_read == caption
    assert result.notes[0].startswith(f"Drawn as '{caption}'")
    assert [p for p in given if p] == [caption] * 3  # FP16, simulated, deployed ("" is the runner's own)


def test_the_embedded_model_draws_what_a_short_prompt_names():
    """The product path on the shipped model: every seed of 'a blue square' and 'a red circle and a yellow
    triangle' shows what the prompt names (the checker scores only the named attributes)."""
    from mixdq.models import load_pipeline
    from mixdq.tiny.checker import check

    pipe = load_pipeline(device="cpu")
    for prompt in ("a blue square", "a red circle and a yellow triangle"):
        text = read_prompt(pipe, prompt).text
        for seed in range(3):
            image = pipe(
                text,
                num_inference_steps=4,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images[0]
            assert check(image, prompt).correct, (prompt, seed)


def test_generate_image_draws_the_read_caption(fresh_random_pipe):
    """`mixdq generate` (from a model or a checkpoint) and the checkpoint page all draw through generate_image."""
    from mixdq.models import generate_image

    fresh_random_pipe.prompt_language = TINY_SCENE_LANGUAGE
    given = []
    encode = fresh_random_pipe.encode_prompt

    def spy(prompt, *args, **kwargs):
        given.append(prompt)
        return encode(prompt, *args, **kwargs)

    fresh_random_pipe.encode_prompt = spy
    image, reading = generate_image(fresh_random_pipe, "a red circle", seed=3, steps=1, size=64)
    assert reading.text == "a large red circle in the center, on a white background" and reading.note
    assert given == [reading.text] and image.size == (64, 64)
