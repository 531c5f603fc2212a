"""`python -m mixdq ...` as a newcomer would run it."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mixdq.cli import main
from mixdq.config import PrecisionConfig
from mixdq.inventory import layer_inventory

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


def test_generate_rejects_a_config_for_another_model(saved_pipe, tmp_path):
    folder, layers = saved_pipe
    config = PrecisionConfig.uniform(layers, 8, 8)
    config.fingerprint = "0000000000000000"
    config.save(tmp_path / "other.json")
    with pytest.raises(SystemExit, match="made for another model"):
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--device",
                "cpu",
                "--prompt",
                "x",
                "--config",
                str(tmp_path / "other.json"),
            ]
        )


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
