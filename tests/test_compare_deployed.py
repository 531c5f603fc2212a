"""Compare on the deployed model: path selection, FP8 fallback, re-deploy without reload, out-of-memory handling,
the CLI command and the page's report (CPU; the GPU numbers are in bench/results/gpu_studio_h200_2026-12-04.md)."""

import json
import math

import pytest
import torch

from mixdq.config import PrecisionConfig
from mixdq.deploy import runner as runner_module
from mixdq.deploy.runner import DeployedRunner, DeployOutOfMemoryError, GraphedForward, fp8_fallback
from mixdq.evaluate.compare import compare
from mixdq.inventory import layer_inventory

PROMPT = "a red circle"


@pytest.fixture()
def w8(fresh_random_pipe):
    return PrecisionConfig.uniform(layer_inventory(fresh_random_pipe.unet), 8, None)


def test_fp8_layers_fall_back_to_int8_on_a_gpu_without_fp8(monkeypatch, fresh_random_pipe):
    layers = layer_inventory(fresh_random_pipe.unet)
    config = PrecisionConfig.uniform(layers, 8, 8).with_fp8_linears(layers)
    assert config.fp8
    cpu_config, note = fp8_fallback(config, torch.device("cpu"))
    assert cpu_config is config and note is None  # the CPU reference path runs FP8 layers
    monkeypatch.setattr(runner_module.fp8, "fp8_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    fallen, note = fp8_fallback(config, torch.device("cuda"))
    assert fallen.fp8 == [] and fallen.weight_bits == config.weight_bits and config.fp8  # a copy, bits kept
    assert "NVIDIA A100" in note and "8.0" in note and f"{len(config.fp8)} FP8 linears run int8" in note
    monkeypatch.setattr(runner_module.fp8, "fp8_supported", lambda device: True)
    assert fp8_fallback(config, torch.device("cuda")) == (config, None)


def test_redeploy_from_the_fp_weights_without_touching_them(fresh_random_pipe, w8):
    pipe = fresh_random_pipe
    fp_weights = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    runner = DeployedRunner(pipe)
    first = compare(runner, w8, None, PROMPT, seed=1, steps=1, size=64)
    assert first.redeployed and runner.current is first.deploy
    assert first.deployed_vs_simulated["psnr"] > 60  # deployed W8A16 = its simulation up to float rounding
    w4 = PrecisionConfig.uniform(layer_inventory(pipe.unet), 4, None)
    second = compare(runner, w4, None, PROMPT, seed=1, steps=1, size=64)
    assert second.redeployed and second.deploy is not first.deploy
    assert second.measured_bytes < first.measured_bytes  # 4-bit codes hold less than 8-bit ones
    assert second.deployed_vs_fp16["psnr"] < first.deployed_vs_fp16["psnr"]  # fewer bits, further from FP
    # the pipeline keeps its FP weights (the one copy every deploy starts from), unchanged
    for name, param in runner.fp_unet.named_parameters():
        key = name.replace(".fp_module.", ".")
        assert torch.equal(param, fp_weights[key]), name
    assert math.isinf(compare(runner, PrecisionConfig(), None, PROMPT, 1, 1, 64).deployed_vs_fp16["psnr"])


def test_out_of_memory_during_deploy_keeps_the_previous_deploy(monkeypatch, fresh_random_pipe, w8):
    runner = DeployedRunner(fresh_random_pipe)
    kept = runner.deploy(w8, None)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner_module, "deploy", oom)
    w4 = PrecisionConfig.uniform(layer_inventory(fresh_random_pipe.unet), 4, None)
    with pytest.raises(DeployOutOfMemoryError, match="Tried to allocate 2.00 GiB.*previous deployed model is kept"):
        runner.deploy(w4, None)
    assert runner.current is kept
    assert runner.generate("deployed", PROMPT, 0, 1, 64).image.shape == (3, 64, 64)


def test_cpu_calls_are_timed_and_uncapturable_inputs_run_eagerly(fresh_random_pipe):
    unet = fresh_random_pipe.unet
    forward = GraphedForward(unet, use_graphs=True)
    assert not forward.use_graphs and forward.times.method == "cpu_wall"  # no CUDA: no graphs
    runner = DeployedRunner(fresh_random_pipe)
    out = runner.generate("fp16", PROMPT, 0, 2, 64)
    assert out.timing_method == "cpu_wall" and len(out.step_ms) == 2 and all(ms > 0 for ms in out.step_ms)
    assert out.warmup_seconds == 0 and out.peak_bytes is None
    assert "forward" not in vars(unet)  # the stand-in is removed after the image
    with pytest.raises(RuntimeError, match="nothing is deployed yet"):
        runner.generate("deployed", PROMPT, 0, 1, 64)
    with pytest.raises(ValueError, match="'fp16', 'simulated' or 'deployed'"):
        runner.generate("int8", PROMPT, 0, 1, 64)


def test_cli_compare_writes_three_images_and_the_numbers(tmp_path):
    from mixdq.cli import main

    config = tmp_path / "w8.json"
    from mixdq.models import load_pipeline

    pipe = load_pipeline(device="cpu")
    PrecisionConfig.uniform(layer_inventory(pipe.unet), 8, None, model_id=pipe.model_id).save(config)
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(config), "--prompt", "a small green square at the top", "--steps", "1"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "deployed.png", "fp16.png", "simulated.png"]
    summary = json.loads((out / "compare.json").read_text())
    assert summary["kernel_path"].startswith("PyTorch integer reference path on the CPU")
    assert summary["unet_mb"]["deployed"] < summary["unet_mb"]["fp16"] / 1.7
    assert summary["deployed_vs_simulated"]["psnr"] > 60 and summary["timing_method"] == "cpu_wall"


def test_compiled_mode_times_both_unets_compiled(monkeypatch, fresh_random_pipe, w8):
    """With the page's torch.compile option the deployed UNet and a plain FP16 copy are compiled (regionally), and
    the FP16 image comes from that copy: both sides timed the same way. (torch.compile itself is recorded here,
    not run: its speed is measured on the GPU, bench/gpu_studio.py --compiled.)"""
    import importlib

    from torch import nn

    compile_module = importlib.import_module("mixdq.deploy.compile")  # `mixdq.deploy` the attribute is the function

    compiled_unets = []
    monkeypatch.setattr(compile_module, "compile_repeated_blocks", lambda unet, **kw: compiled_unets.append(unet) or 1)
    runner = DeployedRunner(fresh_random_pipe)
    eager = compare(runner, w8, None, PROMPT, 1, 1, 64)
    assert not runner.compiled and not eager.deployed.compiled and not eager.fp16.compiled
    result = compare(runner, w8, None, PROMPT, 1, 1, 64, compiled=True)
    assert runner.compiled and result.deployed.compiled and result.fp16.compiled and not result.simulated.compiled
    baseline, deployed = compiled_unets
    assert deployed is runner.current.unet and baseline is runner._fp16_compiled
    quantizable = (nn.Linear, nn.Conv2d)
    assert all(type(m) in quantizable for m in baseline.modules() if isinstance(m, quantizable))  # plain FP16 layers
    assert result.fp16.image.equal(eager.fp16.image)  # the plain copy computes the same FP16 image
    compare(runner, w8, None, PROMPT, 1, 1, 64, compiled=True)
    assert len(compiled_unets) == 2  # compiled once per deploy, the baseline once per runner
