"""Evaluation metrics on inputs whose answer is known: identical sets, pure mean shifts, a tiny random open_clip."""

import math

import pytest
import torch

from mixdq.evaluate import (
    ClipScorer,
    MetricUnavailableError,
    OpenClipScorer,
    clip_score,
    frechet_distance,
    inception_fid_metric,
    psnr,
    ssim,
)


def test_identical_images_give_ssim_1_and_infinite_psnr():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(images, images), torch.ones(3))
    assert psnr(images, images) == math.inf


def test_degraded_images_score_lower():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (ssim(images, noisy) < 0.95).all()
    shifted = (images + 0.1).clamp(max=2.0)  # no clamp at 1: a known MSE of 0.01
    assert psnr(images, shifted) == pytest.approx(20.0, abs=1e-6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8))


def test_frechet_distance_of_identical_sets_is_zero():
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    scale = 2 * torch.cov(features.double().T).trace().item()
    assert frechet_distance(features, features) <= 1e-6 * scale
    # fewer samples than dimensions: a singular covariance needs no regularisation
    few = features[:5]
    assert frechet_distance(few, few) <= 1e-6 * 2 * torch.cov(few.double().T).trace().item()


def test_frechet_distance_of_a_mean_shift_is_the_squared_shift():
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    distance = frechet_distance(features, features + shift)
    assert distance > 0
    # equal covariances: only ‖Δμ‖² remains
    assert distance == pytest.approx(shift.pow(2).sum().item(), rel=1e-6)


def test_frechet_distance_grows_with_a_covariance_change():
    features = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(features, 1.5 * features) > frechet_distance(features, 1.1 * features) > 0
    with pytest.raises(ValueError, match="N ≥ 2"):
        frechet_distance(features[:1], features[:1])


@pytest.fixture(scope="module")
def tiny_clip_scorer():
    """A randomly initialised open_clip CLIP small enough for the CPU (ENV-NOTES §5); its BPE vocab ships in the
    wheel, so nothing is downloaded."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    return OpenClipScorer(model, open_clip.image_transform(64, is_train=False), SimpleTokenizer())


def test_clip_score_with_a_tiny_open_clip(tiny_clip_scorer):
    assert isinstance(tiny_clip_scorer, ClipScorer)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle above a blue square", "a green triangle on a white background"]
    scores = clip_score(tiny_clip_scorer, images, texts)
    # by hand, through the open_clip model: image i (as a uint8 PIL image) against text j, 100 x cosine
    from PIL import Image

    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]
    model, preprocess, tokenizer = tiny_clip_scorer.model, tiny_clip_scorer.preprocess, tiny_clip_scorer.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(p) for p in pil]))
        text_features = model.encode_text(tokenizer(texts))
    dots = image_features @ text_features.T
    cosines = dots / image_features.norm(dim=1)[:, None] / text_features.norm(dim=1)[None, :]
    torch.testing.assert_close(scores, 100 * cosines.diagonal(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(clip_score(tiny_clip_scorer, images, texts[::-1]), 100 * cosines.flip(1).diagonal())
    assert (scores - clip_score(tiny_clip_scorer, images, texts[::-1])).abs().max() > 0.01  # the pairing matters
    assert torch.equal(clip_score(tiny_clip_scorer, images.clone(), texts), scores)
    assert tiny_clip_scorer.encode_images(images).shape == (2, 32)
    with pytest.raises(ValueError, match="one text per image"):
        clip_score(tiny_clip_scorer, images, texts[:1])


def test_inception_fid_without_weights_is_one_clear_sentence(tmp_path):
    with pytest.raises(MetricUnavailableError) as info:
        inception_fid_metric(tmp_path / "missing.pth")
    message = str(info.value)
    assert "Inception FID needs" in message and message.count(". ") == 0 and "\n" not in message


def test_embedded_judges_plug_in():
    import numpy as np

    from mixdq.evaluate import embedded_checker, embedded_clip_scorer
    from mixdq.tiny import clip as tiny
    from mixdq.tiny.data import render, sample_scenes

    assert (tiny.TINY_CLIP_DIR / tiny.WEIGHTS_FILE).is_file()  # it ships in assets/tiny-clip
    batch = sample_scenes(2, np.random.default_rng(0))
    images = render(batch, size=64)
    assert all(embedded_checker(image, scene) for image, scene in zip(images, batch.scenes))
    scores = clip_score(embedded_clip_scorer(), images, batch.captions())
    assert scores.shape == (2,) and torch.isfinite(scores).all()
