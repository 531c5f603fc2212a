"""Probe: cuBLAS FP8 recipes at the SDXL UNet's linear shapes (unfused and with q/k/v fused), per call.

``kernels.fp8.fp8_linear`` runs ``torch._scaled_mm`` with one of two recipes: tensor-wise (one float32 scale per
operand, W8A8 FP8 layers) or row-wise (``scale_a (M, 1)``, ``scale_b (1, N)``: 4/2-bit codes with per-channel
scales, and FP8 layers fused along N). This times, per shape: FP16 ``F.linear`` (the baseline), tensor-wise,
tensor-wise with ``use_fast_accum``, row-wise with the ``(M, 1)`` column made per call (what fp8_linear does
today) and prepared once, row-wise with fast accumulation, and records which scale layouts ``_scaled_mm``
accepts (a 0-d ``scale_a`` beside a row-wise ``scale_b``; a stride-0 ``(M, 1)`` view). Error columns: max
|out - float32 reference| / max |reference| of the same e4m3 operands. GPU machine only::

    PYTHONPATH=$PWD python3 bench/lab/fp8_recipe_probe.py --out $OUT/fp8_recipe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

from gpu_kernels import gpu_time_us

from kernels.fp8 import FP8_DTYPE, quantize_fp8_weight

REPEATS = 15
# (M, N, K, count per 1024 px step, what): the block linears at both widths, unfused and fused
SHAPES = [
    (4096, 640, 640, 40, "640 q/k/v/out unfused"),
    (4096, 1920, 640, 10, "640 fused q/k/v"),
    (77, 640, 2048, 20, "640 cross k/v unfused"),
    (77, 1280, 2048, 10, "640 fused cross k/v"),
    (4096, 5120, 640, 10, "640 GEGLU"),
    (4096, 640, 2560, 10, "640 FF out"),
    (1024, 1280, 1280, 240, "1280 q/k/v/out unfused"),
    (1024, 3840, 1280, 60, "1280 fused q/k/v"),
    (77, 1280, 2048, 120, "1280 cross k/v unfused"),
    (77, 2560, 2048, 60, "1280 fused cross k/v"),
    (1024, 10240, 1280, 60, "1280 GEGLU"),
    (1024, 1280, 5120, 60, "1280 FF out"),
]


def accepts(call) -> str:
    try:
        call()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 (what _scaled_mm refuses is the data here)
        return f"{type(e).__name__}: {e}"[:200]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def probe(M: int, N: int, K: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K**0.5
    bias = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
    qa, sa = quantize_fp8_weight(x)
    qw, sw = quantize_fp8_weight(w)
    sw_row = (torch.rand(N, device="cuda") * 0.5 + 0.75) * sw  # per-channel scales of the same magnitude
    col = sa.reshape(1, 1).expand(M, 1).contiguous()
    ref = (qa.float() * sa) @ (qw.float() * sw).t() + bias.float()
    ref_row = (qa.float() * sa) @ (qw.float() * sw_row[:, None]).t() + bias.float()
    wt = qw.t()

    def tensorwise(fast: bool = False):
        return torch._scaled_mm(qa, wt, sa, sw, bias=bias, out_dtype=torch.float16, use_fast_accum=fast)

    def rowwise(column: torch.Tensor | None = None, fast: bool = False):
        scale_a = sa.reshape(1, 1).expand(M, 1).contiguous() if column is None else column
        return torch._scaled_mm(
            qa, wt, scale_a, sw_row.reshape(1, -1), bias=bias, out_dtype=torch.float16, use_fast_accum=fast
        )

    row = {
        "fp16_us": gpu_time_us(lambda: F.linear(x, w, bias), REPEATS),
        "tensorwise_us": gpu_time_us(tensorwise, REPEATS),
        "tensorwise_fast_us": gpu_time_us(lambda: tensorwise(True), REPEATS),
        "rowwise_column_per_call_us": gpu_time_us(rowwise, REPEATS),
        "rowwise_us": gpu_time_us(lambda: rowwise(col), REPEATS),
        "rowwise_fast_us": gpu_time_us(lambda: rowwise(col, True), REPEATS),
        "err_tensorwise": rel(tensorwise(), ref),
        "err_tensorwise_fast": rel(tensorwise(True), ref),
        "err_rowwise": rel(rowwise(col), ref_row),
        "err_rowwise_fast": rel(rowwise(col, True), ref_row),
        "accepts_0d_a_rowwise_b": accepts(
            lambda: torch._scaled_mm(qa, wt, sa, sw_row.reshape(1, -1), out_dtype=torch.float16)
        ),
        "accepts_stride0_column": accepts(
            lambda: torch._scaled_mm(
                qa, wt, sa.reshape(1, 1).expand(M, 1), sw_row.reshape(1, -1), out_dtype=torch.float16
            )
        ),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    assert FP8_DTYPE == torch.float8_e4m3fn
    rows = []
    for M, N, K, count, what in SHAPES:
        row = {"M": M, "N": N, "K": K, "count": count, "what": what, **probe(M, N, K)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
