"""Probe: does a TMA (tensor-descriptor) int8 GEMM reach 60% of the int8 peak at 8192^3 where ours is at 56%?

Our W8A8 kernel (:mod:`kernels.gemm_wxa8`) loads its tiles with pointer arithmetic; on Hopper the Tensor Memory
Accelerator copies whole tiles to shared memory asynchronously, and a persistent grid (one program per SM looping
over tiles) overlaps one tile's epilogue with the next tile's loads. This script times that kernel, with the W8A8
epilogue (zero-point correction by weight row sums, per-channel scale x activation scale, bias, FP16 out), at
the 8192^3 shape over a few tiles, against ``torch._int_mm`` and ours, and checks its output against ours.

GPU machine only (TMA needs sm_90)::

    PYTHONPATH=$PWD python3 bench/gemm_a8_tma_probe.py --out $OUT/tma.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import PackedWeight, reference  # noqa: E402
from kernels.gemm_wxa8 import gemm_a8  # noqa: E402

H100_INT8_PEAK_TOPS = 1979.0


@triton.jit
def gemm_a8_tma_kernel(
    a_desc, w_desc, w_scale_ptr, rowsum_ptr, bias_ptr, out_desc,
    M, N, K, a_scale, a_corr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):  # fmt: skip
    """Persistent: program p computes tiles p, p + NUM_SMS, ...; tiles in GROUP_M-row groups for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        group = tile // num_pid_in_group
        first_m = group * GROUP_M
        group_size = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group_size)
        pid_n = (tile % num_pid_in_group) // group_size
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        tot = acc + a_corr * tl.load(rowsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = tot.to(tl.float32) * (a_scale * w_scale)[None, :]
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], out.to(tl.float16))


def gemm_a8_tma(x, weight: PackedWeight, a_scale, a_corr, bias, config: dict) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N = weight.out_features
    out = torch.empty(M, N, dtype=torch.float16, device=x.device)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    a_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight.data, [bn, bk])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    gemm_a8_tma_kernel[grid](
        a_desc, w_desc, weight.scale, weight.rowsum, bias, out_desc, M, N, K, a_scale, a_corr,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=sms,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


def graph_time_us(fn, calls: int = 10, replays: int = 20) -> float:
    """Median GPU time per call: a CUDA graph of ``calls`` back-to-back calls, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=5),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=8192)
    args = parser.parse_args()
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    n = args.size
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda", generator=gen)
    q, s = reference.quantize_weight(torch.randn(n, n, device="cuda", generator=gen), 8)
    weight = PackedWeight.from_codes(q, s, 8)
    bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    a_scale, a_zp = 0.02, 3
    ours = gemm_a8(x, weight, a_scale, a_zp, bias)
    tops = lambda us: 2 * n**3 / (us * 1e-6) / 1e12
    rows = {"int_mm": graph_time_us(lambda: torch._int_mm(x, weight.data.t())),
            "ours": graph_time_us(lambda: gemm_a8(x, weight, a_scale, a_zp, bias))}  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "size": n, "rows": {}}  # fmt: skip
    for name, us in rows.items():
        result["rows"][name] = {"us": us, "tops": tops(us), "pct_h100_peak": 100 * tops(us) / H100_INT8_PEAK_TOPS}
    for config in CONFIGS:
        name = "tma {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**config)
        try:
            out = gemm_a8_tma(x, weight, a_scale, 128 - a_zp, bias, config)
            err = ((out.float() - ours.float()).abs().max() / ours.float().abs().max()).item()
            us = graph_time_us(lambda c=config: gemm_a8_tma(x, weight, a_scale, 128 - a_zp, bias, c))
            row = {"us": us, "tops": tops(us), "pct_h100_peak": 100 * tops(us) / H100_INT8_PEAK_TOPS, "rel_err": err}
        except Exception as e:  # noqa: BLE001 (a config that does not compile is a row, not the end)
            row = {"error": f"{type(e).__name__}: {e}"[-1500:], "trace": traceback.format_exc()[-1500:]}
        result["rows"][name] = row
        print(name, row, flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    for name, row in result["rows"].items():
        print(f"{name:32s} " + (f"{row['us']:8.1f} us {row['tops']:7.0f} TOPS {row['pct_h100_peak']:5.1f}%"
                                if "us" in row else row["error"][:200]))  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
