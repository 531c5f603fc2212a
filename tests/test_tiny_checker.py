"""The rule-based alignment checker reads rendered scenes back exactly."""

import numpy as np
import torch

from mixdq.tiny.checker import check, detect
from mixdq.tiny.data import Scene, SceneObject, layout, partial_captions, render, sample_scenes


def test_checker_accepts_rendered_images():
    batch = sample_scenes(40, np.random.default_rng(11))
    images = render(batch)
    accuracy = np.mean([check(img, scene).correct for img, scene in zip(images, batch.scenes)])
    assert accuracy >= 0.98  # 1000 rendered scenes measured 1.000 (mixdq.tiny.evaluate_model)


def test_checker_rejects_a_wrong_attribute():
    scene = Scene((SceneObject("circle", "red", "large", "center"),), "white")
    image = render(layout([scene]))[0]
    assert check(image, scene).correct
    for wrong in (
        Scene((SceneObject("square", "red", "large", "center"),), "white"),
        Scene((SceneObject("circle", "blue", "large", "center"),), "white"),
        Scene((SceneObject("circle", "red", "small", "center"),), "white"),
        Scene((SceneObject("circle", "red", "large", "left"),), "white"),
        Scene((SceneObject("circle", "red", "large", "center"),), "black"),
    ):
        assert not check(image, wrong).correct


def test_checker_takes_uint8_hwc_and_captions():
    scene = Scene(
        (SceneObject("triangle", "green", "small", "top"), SceneObject("square", "blue", "large", "right")), "yellow"
    )
    image = (render(layout([scene]))[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert detect(image).canonical() == scene.canonical()
    assert check(image, scene.caption()).correct


def test_checker_scores_partial_captions_on_rendered_scenes():
    rng = np.random.default_rng(12)
    batch = sample_scenes(500, rng)
    _, captions = partial_captions(batch.scenes, rng)
    images = render(batch)
    accuracy = np.mean([check(img, caption).correct for img, caption in zip(images, captions)])
    assert accuracy >= 0.99


def test_checker_scores_only_what_a_partial_caption_names():
    scene = Scene((SceneObject("circle", "red", "small", "bottom"),), "green")
    image = render(layout([scene]))[0]
    for right in (
        "a red circle",
        "red disc",
        "a small red circle",
        "a red circle at the bottom",
        "a red circle on green",
    ):
        assert check(image, right).correct, right
    for wrong in (
        "a blue circle",
        "a red box",
        "a big red circle",
        "a red circle on the left",
        "red circle, white background",
    ):
        assert not check(image, wrong).correct, wrong
    two = Scene((*scene.objects, SceneObject("square", "blue", "large", "top")), "green")
    assert not check(render(layout([two]))[0], "a red circle").correct
    assert check(render(layout([two]))[0], "a red circle and a blue box").correct
