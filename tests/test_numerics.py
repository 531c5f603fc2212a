"""Measurements run in IEEE FP32: TF32 off inside fp32_numerics, and the settings recorded in provenance."""

import copy
import json

import pytest
import torch

from mixdq.calibrate import calibrate
from mixdq.numerics import fp32_numerics, numerics_settings
from mixdq.sensitivity.sweep import SweepSettings, run_sweep

PROMPTS = ["a red circle above a blue square"]
SIZE = {"height": 64, "width": 64}

if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
    FLAGS = (
        (torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"),
        (torch.backends.cudnn.conv, "fp32_precision", "tf32", "ieee"),
    )
else:
    FLAGS = (
        (torch.backends.cuda.matmul, "allow_tf32", True, False),
        (torch.backends.cudnn, "allow_tf32", True, False),
    )
FLAGS += ((torch.backends.cudnn, "benchmark", True, False), (torch.backends.cudnn, "deterministic", False, True))


@pytest.fixture()
def gpu_defaults():
    """TF32 on for matmul and cuDNN and cuDNN autotuning, as a GPU process may have them; restored after."""
    saved = [getattr(owner, attribute) for owner, attribute, _, _ in FLAGS]
    for owner, attribute, outside, _ in FLAGS:
        setattr(owner, attribute, outside)
    yield
    for (owner, attribute, _, _), value in zip(FLAGS, saved, strict=True):
        setattr(owner, attribute, value)


def flags_now() -> list:
    return [getattr(owner, attribute) for owner, attribute, _, _ in FLAGS]


def test_fp32_numerics_turns_tf32_off_inside_and_restores_it(gpu_defaults):
    outside = numerics_settings()
    assert outside["tf32"] and outside["cudnn_conv_fp32"] == "tf32" and outside["cudnn_benchmark"]
    with fp32_numerics() as settings:
        assert flags_now() == [inside for _, _, _, inside in FLAGS]
        assert settings == numerics_settings()
        assert settings["tf32"] is False and settings["matmul_fp32"] == settings["cudnn_conv_fp32"] == "ieee"
        assert settings["cudnn_deterministic"] and not settings["cudnn_benchmark"]
        with fp32_numerics():  # nested: the outer block keeps its settings
            pass
        assert numerics_settings() == settings
    assert flags_now() == [out for _, _, out, _ in FLAGS]
    assert numerics_settings() == outside
    json.dumps(outside)  # JSON-ready for provenance files


class NumericsRecorder:
    """The numerics in effect at every UNet call."""

    def __init__(self, unet):
        self.seen = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.seen.append(numerics_settings()))


def test_calibration_and_sweep_run_without_tf32_and_record_it(random_pipe, gpu_defaults, tmp_path):
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = random_pipe.model_id
    recorder = NumericsRecorder(pipe.unet)
    ranges = calibrate(pipe, PROMPTS, num_inference_steps=1, act_bits=(8,), progress=False, **SIZE)
    calibration_calls = len(recorder.seen)
    assert flags_now() == [out for _, _, out, _ in FLAGS]  # restored after calibration
    settings = SweepSettings(prompts=tuple(PROMPTS), layers=("conv_in",), weight_bits=(4,), targets=("weight",), **SIZE)
    table, _ = run_sweep(pipe, ranges, settings, cache_dir=tmp_path, progress=False)
    recorder.handle.remove()
    assert calibration_calls >= 1 and len(recorder.seen) > calibration_calls  # both ran the UNet
    assert all(seen["tf32"] is False and seen["cudnn_conv_fp32"] == "ieee" for seen in recorder.seen)
    assert all(seen["cudnn_deterministic"] and not seen["cudnn_benchmark"] for seen in recorder.seen)
    assert ranges.provenance["numerics"] == recorder.seen[0]
    (record,) = tmp_path.glob("sensitivity-*.json")
    assert json.loads(record.read_text())["provenance"]["numerics"] == recorder.seen[-1]
    assert len(table) == 1
    assert numerics_settings()["tf32"]  # the process's own settings are back
