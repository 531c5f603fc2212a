"""The studio's compare service on the embedded model: the same noise, metrics, and the model's own judges."""

import math

from mixdq.config import PrecisionConfig
from studio.services import ModelWorkspace, image_metrics


def test_image_metrics_identical_images():
    import torch

    image = torch.rand(3, 32, 32)
    metrics = image_metrics(image, image)
    assert metrics["psnr"] == math.inf and abs(metrics["ssim"] - 1.0) < 1e-6


def test_compare_on_the_embedded_model(tmp_path):
    from mixdq.models import load_pipeline

    workspace = ModelWorkspace(load_pipeline(device="cpu"), tmp_path)
    fp_only = PrecisionConfig(model_id=workspace.model_id)  # nothing quantized: both images must match
    out = workspace.compare(
        fp_only, "a large red circle in the center, on a white background", seed=3, steps=1, size=128
    )
    m = out["metrics"]
    assert m["psnr"] == math.inf and m["clip_fp"] == m["clip_quant"]
    assert m["aligned_fp"] is True and m["aligned_quant"] is True  # the embedded model draws this caption right
    w8 = PrecisionConfig.uniform(workspace.layers, 8, None, model_id=workspace.model_id)
    out = workspace.compare(w8, "a photo of a cat", seed=3, steps=1, size=128)
    assert out["metrics"]["aligned_fp"] is None  # not a caption the checker can read
    assert 30 < out["metrics"]["psnr"] < math.inf and out["quant_mb"] < out["fp_mb"] / 1.9
    assert out["fp"].size == (128, 128) and out["diff"].size == (128, 128)


def test_shipped_table_is_used_only_for_its_own_model(tmp_path, random_pipe):
    from mixdq.inventory import layer_inventory
    from mixdq.models import load_pipeline
    from studio.sources import find_model_table

    # the random fixture has the embedded model's layer names but other widths
    assert find_model_table(layer_inventory(random_pipe.unet), tmp_path) is None
    table = find_model_table(layer_inventory(load_pipeline(device="cpu").unet), tmp_path)
    assert table is not None and table.layer.nunique() == 264
