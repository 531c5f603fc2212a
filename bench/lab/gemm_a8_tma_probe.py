"""Probe: tiles of the TMA int8 GEMM (:mod:`kernels.gemm_a8_tma`) at 8192^3, against ours and ``torch._int_mm``.

:func:`kernels.gemm_wxa8.gemm_a8` launches the TMA kernel for large 8-bit GEMMs with the tile in
``kernels.gemm_a8_tma.GPU_CONFIG``; this script times that kernel with a few other tiles (the config dict
swapped per row), checks every output against the pointer-loading kernel's, and writes TOPS and % of the H100's
dense int8 peak. Session 7 chose 128x256x128 / 8 warps / 3 stages with it (call 19, made by this probe's first
version, which carried its own copy of the kernel: ``bench/lab/results/gemm_a8_tma_probe_h200_2026-11-28.json``).

GPU machine only (TMA needs sm_90)::

    PYTHONPATH=$PWD python3 bench/lab/gemm_a8_tma_probe.py --out $OUT/tma.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

from gpu_kernels import H100_INT8_PEAK_TOPS, gpu_time_us

from kernels import PackedWeight, gemm_a8_tma, reference
from kernels.gemm_wxa8 import gemm_a8

TILES = [
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 5},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    n = args.size
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda", generator=gen)
    q, s = reference.quantize_weight(torch.randn(n, n, device="cuda", generator=gen), 8)
    weight = PackedWeight.from_codes(q, s, 8)
    bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    run = lambda tma: gemm_a8(x, weight, 0.02, 3, bias, tma=tma)
    pointer_loading = run(False)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "size": n, "rows": {}}  # fmt: skip

    def record(name: str, us: float, **extra) -> None:
        tops = 2 * n**3 / (us * 1e-6) / 1e12
        result["rows"][name] = {"us": us, "tops": tops, "pct_h100_peak": 100 * tops / H100_INT8_PEAK_TOPS, **extra}
        print(f"{name:32s} {us:8.1f} us {tops:7.0f} TOPS {100 * tops / H100_INT8_PEAK_TOPS:5.1f}%", flush=True)
        args.out.write_text(json.dumps(result, indent=1))

    record("int_mm", gpu_time_us(lambda: torch._int_mm(x, weight.data.t()), args.repeats))
    record("ours, pointer loads", gpu_time_us(lambda: run(False), args.repeats))
    default = dict(gemm_a8_tma.GPU_CONFIG)
    try:
        for tile in TILES:
            name = "tma {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**tile)
            gemm_a8_tma.CONFIG.clear()
            gemm_a8_tma.CONFIG.update(tile)
            try:
                err = ((run(True).float() - pointer_loading.float()).abs().max()).item()
                record(name, gpu_time_us(lambda: run(True), args.repeats), max_abs_diff=err)
            except Exception as e:  # noqa: BLE001 (a tile that does not fit in shared memory is a row, not the end)
                result["rows"][name] = {"error": f"{type(e).__name__}: {e}"[-1500:]}
                print(name, result["rows"][name]["error"][:200], flush=True)
    finally:
        gemm_a8_tma.CONFIG.clear()
        gemm_a8_tma.CONFIG.update(default)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
