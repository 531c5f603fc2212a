"""The evaluation loop end to end on the random fixture pipeline: FP, uniform W8A8 and W4A8, 64 px, 1 step."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mixdq.config import PrecisionConfig
from mixdq.evaluate import evaluate, load_results, save_results
from mixdq.inventory import layer_inventory

PROMPTS = ["a red circle on the left", "a large blue square at the top", "a green triangle", "a small cyan circle"]
SEED = 7


class PixelScorer:
    """A stand-in ClipScorer: colour statistics of images, a fixed character histogram of texts (both 12-d).
    Only the interface matters here; the real CLIP adapter is tested in test_evaluate_metrics."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 2).flatten(1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.stack(
            [torch.bincount(torch.tensor([ord(c) % 12 for c in t]), minlength=12).float() for t in texts]
        )


def is_image(image: torch.Tensor, expected: torch.Tensor) -> bool:
    """A stand-in alignment checker whose ground truth is an image: does the generated image equal it?"""
    return torch.allclose(image, expected, atol=1e-5)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from mixdq.models import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    layers = layer_inventory(pipe.unet)
    configs = {
        "FP16": None,
        "W8A8": PrecisionConfig.uniform(layers, 8, 8),
        "W4A8": PrecisionConfig.uniform(layers, 4, 8),
    }
    # FP images made one at a time, outside evaluate, as the checker's ground truth: the FP row scores 1 only if
    # evaluate's batched generation gives image i the noise of seed i.
    fp_images = torch.cat(
        [
            pipe(
                p,
                num_inference_steps=1,
                guidance_scale=0.0,
                height=64,
                width=64,
                output_type="pt",
                generator=torch.Generator("cpu").manual_seed(SEED + i),
            ).images
            for i, p in enumerate(PROMPTS)
        ]
    )
    table = evaluate(
        pipe,
        configs,
        PROMPTS,
        seeds=SEED,
        num_inference_steps=1,
        height=64,
        width=64,
        scorer=PixelScorer(),
        checker=is_image,
        attributes=list(fp_images),
        calibration_prompts=PROMPTS[:2],
        cache_dir=tmp_path_factory.mktemp("calib"),
        batch_size=3,
        progress=False,
    )
    return table, tmp_path_factory.mktemp("results")


def test_table_rows_and_reference_row(evaluated):
    table, _ = evaluated
    assert list(table.config) == ["FP16", "W8A8", "W4A8"]
    assert {"ssim", "psnr_db", "clip_score", "fd", "alignment", "weight_mb", "weight_ratio"} <= set(table.columns)
    fp = table.set_index("config").loc["FP16"]
    assert fp.ssim == pytest.approx(1.0) and fp.psnr_db == math.inf and fp.fd == pytest.approx(0.0, abs=1e-9)
    assert fp.alignment == 1.0  # batched generation reproduces the one-at-a-time FP images
    assert (table.alignment[1:] == 0.0).all()  # quantization changes every image
    assert (table.aligned_lost[1:] == len(PROMPTS)).all() and (table.aligned_gained[1:] == 0).all()
    assert (table.alignment_delta_se[1:] == 0.0).all()  # every prompt lost: no spread
    assert fp.weight_ratio == pytest.approx(1.0) and fp.avg_weight_bits == 16


def test_fewer_bits_cost_quality_and_save_memory(evaluated):
    table, _ = evaluated
    rows = table.set_index("config")
    assert rows.loc["W8A8", "ssim"] >= rows.loc["W4A8", "ssim"]
    assert rows.loc["W8A8", "ssim"] < 1.0 and math.isfinite(rows.loc["W8A8", "psnr_db"])
    assert rows.loc["W4A8", "fd"] > 0
    assert rows.loc["FP16", "weight_mb"] > rows.loc["W8A8", "weight_mb"] > rows.loc["W4A8", "weight_mb"]
    assert rows.loc["W4A8", "avg_weight_bits"] == 4
    assert table.clip_score.map(math.isfinite).all()


def test_results_round_trip_through_csv_and_json(evaluated):
    table, directory = evaluated
    csv_path, json_path = save_results(table, directory / "quality")
    pd.testing.assert_frame_equal(load_results(csv_path), table)
    from_json = load_results(json_path)
    pd.testing.assert_frame_equal(from_json, table)
    assert from_json.attrs["seeds"] == [SEED + i for i in range(len(PROMPTS))] and from_json.attrs["height"] == 64


def test_inputs_are_checked(random_pipe):
    with pytest.raises(ValueError, match="one per prompt"):
        evaluate(random_pipe, {"FP16": None}, PROMPTS, seeds=[1, 2], progress=False)
    with pytest.raises(ValueError, match="both a checker and attributes"):
        evaluate(random_pipe, {"FP16": None}, PROMPTS, checker=is_image, progress=False)


def test_results_paths_keep_dots_in_the_stem(tmp_path):
    """`--out results/quality_k0.621` once wrote quality_k0.json (with_suffix cut '.621' off)."""
    from mixdq.evaluate.runner import results_path

    assert results_path(tmp_path / "quality_k0.621", ".json").name == "quality_k0.621.json"
    assert results_path(tmp_path / "quality", ".csv").name == "quality.csv"
    assert results_path(tmp_path / "quality.csv", ".json").name == "quality.json"


def test_paired_alignment_counts_flips_and_their_standard_error():
    from mixdq.evaluate.runner import _add_paired_alignment

    rows = [{"config": "FP"}, {"config": "Q"}]
    verdicts = {"FP": torch.tensor([1.0, 1, 0, 0]), "Q": torch.tensor([1.0, 0, 1, 0])}
    _add_paired_alignment(rows, verdicts, "FP")
    assert "aligned_lost" not in rows[0]
    assert rows[1]["aligned_lost"] == 1 and rows[1]["aligned_gained"] == 1
    assert rows[1]["alignment_delta_se"] == pytest.approx((2 / 3) ** 0.5 / 2)  # std of (0, -1, 1, 0) / sqrt(4)
