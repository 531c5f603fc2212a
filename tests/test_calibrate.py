"""Calibration: ranges for every layer and bit, on-disk cache, default prompts."""

import copy
import json
import logging

import pytest
import torch

import mixdq.calibrate as calibrate_module
from mixdq.calibrate import FALLBACK_PROMPTS, calibrate, default_prompts
from mixdq.config import ACT_BITS, ConfigError, PrecisionConfig
from mixdq.inventory import layer_inventory
from mixdq.quant import quant_layers, quantization_off, quantize_
from mixdq.quant.ranges import ActivationRanges

PROMPTS = ["a red circle above a blue square", "a green triangle on a white background"]
SETTINGS = {"num_inference_steps": 1, "height": 64, "width": 64, "batch_size": 2, "progress": False}


def pipe_with_own_unet(random_pipe):
    """The shared pipeline's components with a private UNet copy (calibration wraps UNet layers)."""
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = random_pipe.model_id
    return pipe


class UNetCallCounter:
    def __init__(self, unet):
        self.calls = 0
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


@pytest.fixture(scope="module")
def calibrated(random_pipe, tmp_path_factory):
    """One calibration (2 prompts, 1 step, 64 px) written to a cache folder, shared by the tests below."""
    pipe = pipe_with_own_unet(random_pipe)
    cache = tmp_path_factory.mktemp("calib-cache")
    counter = UNetCallCounter(pipe.unet)
    ranges = calibrate(pipe, PROMPTS, cache_dir=cache, **SETTINGS)
    return pipe, ranges, cache, counter


def test_ranges_for_every_layer_and_bit(calibrated):
    pipe, ranges, _, counter = calibrated
    layers = layer_inventory(pipe.unet)
    assert counter.calls == len(ACT_BITS), "one UNet call per act bit (1 batch, 1 step)"
    assert sorted(ranges.ranges) == sorted(ACT_BITS)
    for bits in ACT_BITS:
        assert set(ranges.ranges[bits]) == {i.name for i in layers}
        for info in layers:
            r = ranges.ranges[bits][info.name]
            assert r.shape == ((2, 2) if info.concat_split else (1, 2)) and r.dtype == torch.float32
            assert torch.all(r[:, 0] <= r[:, 1])
    # Upstream layers are quantized while calibrating: layers fed by model inputs (latents, timestep,
    # added embeddings, text embedding) have identical ranges at both bits; every other layer sees the
    # 4- vs 8-bit error of the layers before it.
    entry = {"conv_in", "time_embedding.linear_1", "add_embedding.linear_1"}
    entry |= {i.name for i in layers if i.takes_text_embedding}
    for name in ranges.ranges[8]:
        assert torch.equal(ranges.ranges[4][name], ranges.ranges[8][name]) == (name in entry), name
    p = ranges.provenance
    assert (p["num_inference_steps"], p["seed"], p["height"], p["width"], p["act_bits"]) == (1, 0, 64, 64, [4, 8])
    assert p["weight_bits"] == "W8" and p["num_prompts"] == 2 and len(p["fingerprint"]) == 16


def test_unet_left_fp_with_ranges_loaded(calibrated, random_pipe):
    pipe, ranges, _, _ = calibrated
    layers = quant_layers(pipe.unet)
    assert len(layers) == 264
    assert all(q.weight_bits is None and q.act_bits is None for q in layers.values())
    assert all(torch.equal(q.act_range(8), ranges.ranges[8][n]) for n, q in layers.items())
    g = torch.Generator().manual_seed(3)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([999.0]),
        "encoder_hidden_states": torch.randn(1, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.randn(1, 6, generator=g),
        },
    }
    with torch.no_grad():
        assert torch.equal(pipe.unet(**inputs).sample, random_pipe.unet(**inputs).sample)
        # ranges are loaded: a W8A8 config applies without passing act_ranges again
        quantize_(pipe.unet, PrecisionConfig.uniform(layer_inventory(pipe.unet), 8, 8))
        with quantization_off(pipe.unet):
            assert torch.equal(pipe.unet(**inputs).sample, random_pipe.unet(**inputs).sample)
        quantize_(pipe.unet, None)


def test_cache_hit_skips_pipeline_and_changes_recompute(calibrated):
    pipe, ranges, cache, counter = calibrated
    before = counter.calls
    again = calibrate(pipe, PROMPTS, cache_dir=cache, **SETTINGS)
    assert counter.calls == before, "a matching cache must not run the pipeline"
    assert again.provenance == ranges.provenance
    for bits in ACT_BITS:
        assert all(torch.equal(again.ranges[bits][n], r) for n, r in ranges.ranges[bits].items())
    calibrate(pipe, PROMPTS, cache_dir=cache, seed=1, **SETTINGS)
    assert counter.calls == before + len(ACT_BITS), "a changed seed recomputes"
    calibrate(pipe, PROMPTS[:1], cache_dir=cache, **SETTINGS)
    assert counter.calls == before + 2 * len(ACT_BITS), "a changed prompt set recomputes"
    only8 = calibrate(pipe, PROMPTS, cache_dir=cache, act_bits=(8,), **SETTINGS)
    assert sorted(only8.ranges) == [8], "ranges of other bits still held by the UNet are not part of the result"
    assert len(list(cache.iterdir())) == 4, "one cache folder per setting"


def test_save_load_round_trip(calibrated, tmp_path):
    _, ranges, _, _ = calibrated
    ranges.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "mixdq-studio/activation-ranges" and manifest["provenance"] == ranges.provenance
    loaded = ActivationRanges.load(tmp_path)
    assert loaded.provenance == ranges.provenance
    assert all(torch.equal(loaded.ranges[b][n], r) for b in ranges.ranges for n, r in ranges.ranges[b].items())
    with pytest.raises(ValueError, match="holds no activation ranges"):
        ActivationRanges.load(tmp_path / "missing")


def test_bad_arguments(random_pipe):
    with pytest.raises(ValueError, match=r"act_bits: 6 not allowed; choose from \[4, 8\]"):
        calibrate(random_pipe, PROMPTS, act_bits=(6,), **SETTINGS)
    with pytest.raises(ConfigError, match=r"has bits 3; allowed: \[2, 4, 8\]"):
        calibrate(random_pipe, PROMPTS, weight_bits=3, **SETTINGS)
    with pytest.raises(ValueError, match="at least one prompt"):
        calibrate(random_pipe, [], **SETTINGS)
    assert quant_layers(random_pipe.unet) == {}, "argument errors are raised before the UNet is touched"


def test_default_prompts_file_and_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(calibrate_module, "PROMPTS_FILE", tmp_path / "prompts.txt")
    with caplog.at_level(logging.WARNING, logger="mixdq.calibrate"):
        assert default_prompts() == list(FALLBACK_PROMPTS)
    assert "built-in shape captions" in caplog.text
    (tmp_path / "prompts.txt").write_text("# calibration prompts\na red circle\n\na blue square\n")
    assert default_prompts() == ["a red circle", "a blue square"]
