"""Probe: the grouped e4m3 unpacking of one SDXL transformer block's low-bit weights, per launch shape.

:func:`kernels.unpack.unpack_group` unpacks a block's 7 linear weights (after q / k / v fusion) in one
launch. This times it for the 1280- and 640-wide SDXL blocks at 4 and 2 bits over rows per program
(``GROUP_BLOCK_N``) and warps (``GROUP_WARPS``), against one per-layer launch per weight, and reports the memory
speed (packed bytes read + e4m3 bytes written per second). GPU machine only::

    PYTHONPATH=$PWD python3 bench/lab/unpack_group_probe.py --out $OUT/unpack_group.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

from gpu_kernels import gpu_time_us

from kernels import (
    PackedWeight,
    unpack,
)

REPEATS = 15


def block_shapes(width: int, cross: int = 2048) -> list[tuple[int, int]]:
    """(N, K) of a BasicTransformerBlock's linears with fused q/k/v and k/v: SDXL's layout."""
    return [
        (3 * width, width),  # attn1.to_qkv
        (width, width),  # attn1.to_out.0
        (width, width),  # attn2.to_q
        (2 * width, cross),  # attn2.to_kv
        (width, width),  # attn2.to_out.0
        (8 * width, width),  # ff.net.0.proj (GEGLU)
        (width, 4 * width),  # ff.net.2
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for width in (1280, 640):
        for bits in (4, 2):
            weights = []
            for n, k in block_shapes(width):
                q = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (n, k), dtype=torch.int8, device="cuda")
                weights.append(PackedWeight.from_codes(q, torch.ones(n, device="cuda"), bits))
            moved = sum(w.data.numel() + w.out_features * w.in_features for w in weights)
            row = {"width": width, "bits": bits, "mbytes_moved": moved / 1e6}
            row["per_layer_us"] = gpu_time_us(lambda ws=weights: [w.codes_fp8("triton") for w in ws], REPEATS)
            for block_n in (32, 64, 128, 256):
                for warps in (4, 8):
                    unpack.GROUP_BLOCK_N, unpack.GROUP_WARPS = block_n, warps
                    flat = PackedWeight.codes_fp8_group(weights, "triton")
                    expected = PackedWeight.codes_fp8_group(weights, "torch")
                    assert torch.equal(flat.view(torch.uint8), expected.view(torch.uint8)), (block_n, warps)
                    row[f"grouped_n{block_n}_w{warps}_us"] = gpu_time_us(
                        lambda ws=weights: PackedWeight.codes_fp8_group(ws, "triton"), REPEATS
                    )
            best = min((v, k) for k, v in row.items() if k.startswith("grouped_"))
            row["best"] = best[1]
            row["best_tb_per_s"] = moved / (best[0] * 1e-6) / 1e12
            row["per_layer_tb_per_s"] = moved / (row["per_layer_us"] * 1e-6) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
