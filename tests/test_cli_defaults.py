"""The CLI's defaults fit together: `allocate` makes configs for the model `generate` loads, errors name the flag,
and torch's CPU threads are set as app.py sets them (and restored for in-process callers)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from mixdq import cli
from mixdq.cli.allocate import PUBLISHED_SOURCE
from mixdq.config import PrecisionConfig
from mixdq.inventory import inventory_fingerprint, inventory_from_unet_config
from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from mixdq.sensitivity.published import load_published_table


@pytest.fixture(scope="module")
def embedded_layers():
    return list(inventory_from_unet_config(EMBEDDED_MODEL_DIR / "unet" / "config.json").layers)


def test_plain_allocate_is_for_the_embedded_model(tmp_path, capsys, embedded_layers):
    out = tmp_path / "w4a8.json"
    assert cli.main(["allocate", "--budget-mb", "4.4", "--solver", "approx", "--out", str(out)]) == 0
    config = PrecisionConfig.load(out)
    config.validate(embedded_layers)
    assert config.model_id == EMBEDDED_MODEL_ID and config.fingerprint == inventory_fingerprint(embedded_layers)
    mb = float(capsys.readouterr().out.rsplit("UNet weights: ", 1)[1].split()[0])
    assert 4.0 < mb <= 4.4  # the embedded UNet is 16.96 MB in FP16; 4.4 MB is about 4 bits


def test_a_table_of_another_model_names_unet_config(tmp_path, capsys):
    table = tmp_path / "turbo.csv"
    load_published_table().to_csv(table, index=False)  # SDXL-Turbo's 794 layers, not the embedded model's 264
    assert cli.main(["allocate", "--source", str(table), "--budget-bits", "4", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "pass --unet-config PATH" in err and "disagree on layers" in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_unet_config_is_refused_for_a_named_source(tmp_path, capsys):
    argv = ["allocate", "--source", PUBLISHED_SOURCE, "--unet-config", str(EMBEDDED_MODEL_DIR), "--budget-bits", "4"]
    assert cli.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    assert "--unet-config is for a table --source" in capsys.readouterr().err


def test_pipeline_commands_leave_one_core_free_and_restore_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    seen = []
    monkeypatch.setattr(cli, "cmd_sensitivity", lambda args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    shard = tmp_path / "a.csv"
    pd.DataFrame().to_csv(shard)
    assert cli.main(["sensitivity", "--merge", str(shard), "--out", str(tmp_path / "m.csv")]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
    torch.set_num_threads(1)
    try:
        assert cli.main(["sensitivity", "--merge", str(shard), "--out", str(tmp_path / "m.csv")]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_every_command_shares_one_cache_default():
    parser = cli.build_parser()
    for command in ("calibrate", "generate", "sensitivity", "evaluate"):
        args = parser.parse_args([command, "--prompt", "x"] if command == "generate" else [command])
        assert args.cache_dir == cli.DEFAULT_CACHE
