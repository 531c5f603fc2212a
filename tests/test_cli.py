"""`python -m mixdq ...` as a newcomer would run it."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mixdq.cli import main
from mixdq.config import PrecisionConfig
from mixdq.inventory import inventory_fingerprint, layer_inventory

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_the_workflow():
    out = subprocess.run(
        [sys.executable, "-m", "mixdq", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for command in ("calibrate", "generate", "sensitivity", "allocate"):
        assert command in out


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    from mixdq.models import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("model") / "pipe"
    pipe.save_pretrained(folder)
    return folder, layer_inventory(pipe.unet)


def test_generate_fp_and_quantized_pngs(saved_pipe, tmp_path, capsys):
    folder, layers = saved_pipe
    config = PrecisionConfig.uniform(layers, 8, 8, model_id="random")
    config.save(tmp_path / "w8a8.json")
    common = [
        "--model",
        str(folder),
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--steps",
        "1",
        "--size",
        "64",
    ]
    assert (
        main(
            [
                "generate",
                *common,
                "--prompt",
                "a red circle",
                "--config",
                str(tmp_path / "w8a8.json"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["a-red-circle-seed0-fp.png", "a-red-circle-seed0-quant.png"]
    assert all(Image.open(p).size == (64, 64) for p in written)
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())  # calibration was cached


def test_generate_rejects_a_config_for_another_model(saved_pipe, tmp_path, capsys):
    folder, layers = saved_pipe
    config = PrecisionConfig.uniform(layers, 8, 8, model_id="other/model")
    config.fingerprint = "0000000000000000"
    config.save(tmp_path / "other.json")
    argv = ["generate", "--model", str(folder), "--device", "cpu", "--prompt", "x", "--config"]
    assert main([*argv, str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1]  # after the pipeline's progress bars
    assert last.startswith(f"error: {tmp_path / 'other.json'}: this config was made for another model (other/model, ")
    assert f"this is {folder} (architecture {inventory_fingerprint(layers)}" in last and err.count("error") == 1


def test_generate_reads_the_exported_yaml_pair(saved_pipe, tmp_path, monkeypatch):
    """`--config STEM` finds STEM_weight.yaml + STEM_act.yaml (as `allocate --yaml-out STEM` writes them)."""
    import mixdq.calibrate
    import mixdq.quant

    folder, layers = saved_pipe
    config = PrecisionConfig.uniform(layers, 4, 8, protected=["conv_in"])
    config.weight_bits["conv_out"] = 8
    weight_yaml, act_yaml = config.to_mixdq_yaml(layers)
    (tmp_path / "cfg_weight.yaml").write_text(weight_yaml)
    (tmp_path / "cfg_act.yaml").write_text(act_yaml)
    handed = []

    def stop_at_quantization(pipe, config, ranges=None, **kwargs):
        handed.append(config)
        raise KeyboardInterrupt  # the config reached quantization; no need to generate

    monkeypatch.setattr(mixdq.calibrate, "calibrate", lambda *args, **kwargs: None)
    monkeypatch.setattr(mixdq.quant, "quantize_", stop_at_quantization)
    argv = ["generate", "--model", str(folder), "--device", "cpu", "--prompt", "x", "--out", str(tmp_path / "out")]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--size", "64", "--config", str(tmp_path / "cfg")])
    (loaded,) = handed
    assert loaded.protected == ["conv_in"] and loaded.layer_weight_bits("conv_out") == 8
    assert [loaded.layer_weight_bits(i.name) for i in layers] == [config.layer_weight_bits(i.name) for i in layers]
    assert [loaded.layer_act_bits(i.name) for i in layers] == [config.layer_act_bits(i.name) for i in layers]


def test_a_bad_config_is_one_line_and_status_2_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mixdq-studio/precision-config", "schema_version": 1, "weight_bits": {"a": 4.0}}')
    run = subprocess.run(
        [sys.executable, "-m", "mixdq", "generate", "--model", "no/such-model", "--prompt", "x", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr == f"error: {bad}: weight_bits: layer 'a' has bits 4.0; allowed: [2, 4, 8].\n"


def test_missing_model_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "stabilityai/sdxl-turbo", "--device", "cpu", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Model 'stabilityai/sdxl-turbo' is not available offline") and err.count("\n") == 1


def test_bad_shard_argument():
    with pytest.raises(SystemExit):
        main(["sensitivity", "--shard", "3/2"])


def test_allocate_select_k_picks_the_best_scoring_candidate(tmp_path, capsys):
    """--select-k generates each candidate K's images on held-out captions and keeps the best by PSNR."""
    import torch

    tiny = ROOT / "assets" / "tiny-sdxl"
    args = ["allocate", "--source", str(tiny / "sensitivity.csv"), "--unet-config", str(tiny), "--budget-bits", "4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the embedded model's ops are too small to share between OpenMP threads
    try:
        small = ["--select-k", "embedded", "--validation-prompts", "2", "--calibration-prompts", "2"]
        code = main([*args, *small, "--validation-steps", "1", "--out", str(tmp_path / "k.json")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    config = PrecisionConfig.load(tmp_path / "k.json")
    chosen = config.metadata["allocation"]["k_selection"]
    scores = {c["k"]: c["psnr_db"] for c in chosen["candidates"]}
    assert len(scores) >= 5 and any(c["auto"] for c in chosen["candidates"])
    assert scores[chosen["k"]] == max(scores.values())
    assert f"chosen K = {chosen['k']:.4f}" in capsys.readouterr().out

    assert main([*args, "--select-k", "embedded", "--k", "0.5", "--out", str(tmp_path / "x.json")]) == 2
    assert "drop --k" in capsys.readouterr().err
