"""The default tile rule (no autotuning): the largest tile that fills one wave of SMs, M-capped tiles for M = 1."""

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from kernels.gemm_wxa8 import get_gemm_a8_autotune_config  # noqa: E402
from kernels.tiles import pick_gemm_config, prune_by_m, tile_count  # noqa: E402

H100_SMS = 132


def full_configs() -> list:
    cfg = lambda m, n, k: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8})
    return [cfg(128, 256, 128), cfg(256, 128, 128), cfg(128, 128, 128), cfg(128, 128, 64), cfg(64, 128, 128),
            cfg(64, 64, 128), cfg(32, 128, 128), cfg(16, 64, 256)]  # fmt: skip


def area(config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


@pytest.mark.parametrize("M, N", [(16384, 1280), (4096, 640), (1024, 1280), (1024, 10240), (77, 1280), (1, 1280)])
def test_picked_tile_is_the_largest_that_fills_a_wave(M, N):
    configs = prune_by_m(full_configs(), {"M": M})
    picked = pick_gemm_config(configs, M, N, H100_SMS)
    filling = [c for c in configs if tile_count(c, M, N) >= H100_SMS]
    if filling:
        assert tile_count(picked, M, N) >= H100_SMS
        assert area(picked) == max(area(c) for c in filling)
    else:  # too small a problem for one wave: as many tiles as possible
        assert tile_count(picked, M, N) == max(tile_count(c, M, N) for c in configs)


def test_examples_at_sdxl_shapes():
    configs = full_configs()
    pick = lambda M, N: pick_gemm_config(prune_by_m(configs, {"M": M}), M, N, H100_SMS).kwargs
    assert (pick(16384, 1280)["BLOCK_M"], pick(16384, 1280)["BLOCK_N"]) == (128, 256)  # 640 tiles
    assert (pick(1024, 1280)["BLOCK_M"], pick(1024, 1280)["BLOCK_N"]) == (64, 128)  # 160 tiles; 128x128 has 80
    assert pick(1, 1280)["BLOCK_M"] == 16  # time-embedding linears: no 128-row tile for one row


def test_interpreter_config_list_has_one_choice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (only,) = get_gemm_a8_autotune_config()
    assert pick_gemm_config([only], 5, 7, 1) is only
