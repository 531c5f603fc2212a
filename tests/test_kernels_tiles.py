"""The default tile rule (no autotuning): the largest tile that fills one wave of SMs, M-capped tiles for M = 1."""

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from kernels.gemm_wxa8 import get_gemm_a8_autotune_config
from kernels.tiles import pick_gemm_config, prune_by_m, tile_count

H100_SMS = 132


def full_configs() -> list:
    cfg = lambda m, n, k: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8})
    return [cfg(128, 256, 128), cfg(256, 128, 128), cfg(128, 128, 128), cfg(128, 128, 64), cfg(64, 128, 128),
            cfg(64, 64, 128), cfg(32, 128, 128), cfg(16, 64, 256)]  # fmt: skip


# Worked by hand from full_configs() and 132 SMs: the largest tile (then deepest BLOCK_K) with >= 132 tiles,
# else the most tiles; prune_by_m first drops BLOCK_M above max(16, next power of 2 of M).
@pytest.mark.parametrize(
    "M, N, tile, tiles",
    [
        (16384, 1280, (128, 256, 128), 128 * 5),  # the first 256-wide tile already fills the wave
        (4096, 640, (128, 128, 128), 32 * 5),  # 128x256 has 32 * 3 = 96, 256x128 16 * 5 = 80 tiles
        (1024, 1280, (64, 128, 128), 16 * 10),  # 128x128 has 8 * 10 = 80
        (1024, 10240, (128, 256, 128), 8 * 40),
        (77, 1280, (16, 64, 256), 5 * 20),  # no tile fills a wave: the most tiles (BLOCK_M <= 128 kept)
        (1, 1280, (16, 64, 256), 1 * 20),  # only BLOCK_M = 16 survives the M cap
    ],
)
def test_picked_tile_is_the_largest_that_fills_a_wave(M, N, tile, tiles):
    picked = pick_gemm_config(prune_by_m(full_configs(), {"M": M}), M, N, H100_SMS)
    assert (picked.kwargs["BLOCK_M"], picked.kwargs["BLOCK_N"], picked.kwargs["BLOCK_K"]) == tile
    assert tile_count(picked, M, N) == tiles


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


# the fastest W8A8 tile per SDXL linear shape in the H200 tile sweep (bench/gpu_kernels.py --sweep-tiles w8a8,
# bench/results/gpu_kernels_tiles_h200_2026-11-28.json), and its time; the rule must land within 2% of it
H200_SWEEP_BEST = {  # (M, N, K): {(BLOCK_M, BLOCK_N): µs} for the best tile and near-best ones
    (1024, 1280, 1280): {(64, 64): 8.00, (64, 128): 8.09},
    (1024, 10240, 1280): {(128, 128): 29.30},
    (1024, 1280, 5120): {(64, 64): 20.47, (64, 128): 20.86},
    (77, 1280, 2048): {(16, 64): 5.26},
    (4096, 640, 640): {(128, 128): 8.78},
    (4096, 5120, 640): {(128, 128): 39.67},
}
H200_SMS = 132


@pytest.mark.parametrize("shape", list(H200_SWEEP_BEST))
def test_shipped_tiles_pick_the_measured_best_at_sdxl_shapes(monkeypatch, shape):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's config list, not the interpreter's one
    M, N, _ = shape
    picked = pick_gemm_config(prune_by_m(get_gemm_a8_autotune_config(), {"M": M}), M, N, H200_SMS).kwargs
    measured = H200_SWEEP_BEST[shape]
    tile = (picked["BLOCK_M"], picked["BLOCK_N"])
    assert tile in measured and measured[tile] <= 1.02 * min(measured.values())
