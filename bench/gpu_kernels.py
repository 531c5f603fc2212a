"""Per-layer-shape GEMM benchmark: our Triton kernels vs FP16 cuBLAS, cuBLAS int8 and FP8 on one GPU.

    PYTHONUNBUFFERED=1 python bench/gpu_kernels.py $OUT/gpu_kernels [--px 1024|512] [--repeats 20]

writes ``<prefix>.json`` and ``<prefix>.md``, rewritten after every shape (a killed run keeps what it measured).
A cold run JIT-compiles every kernel variant (``--autotune`` also benchmarks every tile per shape: minutes);
``--shapes 0,1,2`` splits the work over several calls, and Triton's cache (~/.triton/cache) makes later calls on
the same machine fast.

Shapes (M tokens, N out, K in, count per UNet step) are the SDXL UNet linears at 1024 px from
ENV-NOTES.md section 7 (at 512 px M is a quarter, except the 77 text tokens) plus 8192^3 for the peak.

Timing (GPU time, not Python launch time): every op is warmed up first (Triton JIT + autotune), then
captured ``iters`` times back to back in one CUDA graph, with ``iters`` chosen so one replay lasts ~2 ms;
the graph is replayed ``repeats`` times, each replay timed with CUDA events, and the reported time is the
median replay / iters. Operands are the same every iteration, so small weights stay in L2 (50 MB on H100)
for every op alike. TOPS = 2*M*N*K / time; "% peak" is of the H100 SXM dense int8 peak, 1979 TOPS.

Ops:  fp16       F.linear on float16 (cuBLAS)                       baseline
      int8_mm    torch._int_mm int8 x int8 -> int32 (cuBLAS, M > 16)   no dequant epilogue
      fp8        torch._scaled_mm e4m3 x e4m3 -> fp16, per-tensor scales (fp8_fast: use_fast_accum=True)
      actq       our activation quantization alone (fp16 [M, K] -> int8)
      w8a8       our W8A8 from int8 codes (the launch rule: TMA kernel for large shapes, see
                 kernels.gemm_a8_tma);  w8a8_swap: weight as the MMA's left operand;  w8a8_tma: the TMA kernel
                 forced at every shape;
                 w8a8_from_fp16: from fp16 (activation-quantization kernel + GEMM, the eager path)
      w4a8, w2a8 packed int4 / int2 weights, int8 codes in (weight as left operand);  w4a8_noswap: as right
      w8a16, w4a16, w2a16  our weight-only kernels on fp16 activations
      w8_dq, w4_dq, w2_dq  kernels.linear_dequant under torch.compile: the packed weight unpacked to fp16 (int8:
                 an Inductor kernel; int4 / int2: kernels.unpack), then cuBLAS (deploy's linear_path="dequant";
                 in a compiled UNet rounding x to its A8 grid fuses into x's producer, so it is left out here);
                 w4_dq_inductor: the int4 unpacking as PyTorch ops that Inductor compiles instead
      fp8_rowwise  torch._scaled_mm e4m3 x e4m3 -> fp16 with row-wise scales (M, 1) x (1, N)
      w4_fp8, w2_fp8  kernels.fp8.fp8_linear under torch.compile (deploy's W4A8 / W2A8 FP8 layers): x to
                 e4m3, the packed codes unpacked to e4m3 (kernels.unpack), row-wise cuBLAS FP8
Every our-op output is also checked against kernels.reference on the GPU (max |err| / max |ref|).

``--fp8-lowbit``: only the W4A8 / W2A8 FP8 paths, at the fused deployed UNet's linear shapes (FP8_LOWBIT_SHAPES)
for 512 and 1024 px, each as all-4-bit and as all-2-bit, one JSON line per (px, bits, shape) appended to
``<prefix>.jsonl`` as it is measured, ``<prefix>.md`` rewritten after each with the per-step sums:

      fp16           F.linear on float16 (cuBLAS), for scale
      rowwise        cuBLAS row-wise FP8 ``_scaled_mm`` on the weight's codes already unpacked to e4m3 (the
                     ceiling of the unpack-then-GEMM path); rowwise_fast: ``use_fast_accum=True``
      unpack_rowwise the path deployed today: kernels.unpack (codes -> e4m3 in memory) + rowwise
      fused          kernels.gemm_fp8_lowbit (codes unpacked in registers in the GEMM), exact accumulation,
                     default tile rule and orientation; fused_fast: fast accumulation; fused_other: exact,
                     the other MMA orientation (whether kernels.gemm_fp8_lowbit.swap_ab chose well)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import PackedWeight, reference

H100_INT8_PEAK_TOPS = 1979.0
# (M at 1024 px, N, K, count per UNet step); M = 77 are the text tokens of cross-attention K/V
UNET_SHAPES = [
    (1024, 1280, 1280, 372),
    (1024, 10240, 1280, 60),
    (1024, 1280, 5120, 60),
    (77, 1280, 2048, 120),
    (4096, 640, 640, 70),
    (4096, 5120, 640, 10),
]
PEAK_SHAPE = (8192, 8192, 8192, 0)
ACT_SCALE, ACT_ZP = 0.02, 131


def gpu_time_us(fn, repeats: int, target_us: float = 2000.0) -> float:
    """Median GPU time of one ``fn()`` call, from CUDA-graph replays of many back-to-back calls."""
    fn()  # JIT + autotune
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    end.synchronize()
    iters = max(5, min(500, math.ceil(target_us / max(1.0, start.elapsed_time(end) * 1000 / 5))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def tile_sweep(fn, kernel, M: int, repeats: int) -> dict[str, float]:
    """GPU time of ``fn`` with every tile the rule could choose at this M: the data a better rule needs."""
    from kernels import tiles

    rule = tiles.rule_config
    times = {}
    try:
        for config in tiles.prune_by_m(kernel.configs, {"M": M}):
            tiles.rule_config = lambda *_, config=config: config
            try:
                times[str(config)] = gpu_time_us(fn, repeats)
            except Exception as e:  # noqa: BLE001 (a tile that does not fit, e.g. in shared memory, is data)
                times[str(config)] = f"{type(e).__name__}: {e}"[:120]
    finally:
        tiles.rule_config = rule
    return times


def bench_shape(M: int, N: int, K: int, repeats: int, dev: str = "cuda", sweep_tiles: tuple = ()) -> dict:
    from kernels import fp8, gemm_weight_only, gemm_wxa8, linear_dequant
    from kernels.act_quant import quantize_act
    from kernels.gemm_weight_only import gemm_a16
    from kernels.gemm_wxa8 import gemm_a8

    g = torch.Generator(device=dev).manual_seed(0)
    x16 = torch.randn(M, K, device=dev, generator=g, dtype=torch.float16)
    w16 = torch.randn(N, K, device=dev, generator=g, dtype=torch.float16) / K**0.5
    x8 = reference.quantize_act(x16, ACT_SCALE, ACT_ZP)
    weights = {}
    for bits in (8, 4, 2):
        q, s = reference.quantize_weight(w16, bits)
        weights[bits] = PackedWeight.from_codes(q, s, bits)
    ops = {
        "fp16": lambda: F.linear(x16, w16),
        "actq": lambda: quantize_act(x16, ACT_SCALE, ACT_ZP),
    }
    if M > 16:
        w8_t = weights[8].data.t()
        ops["int8_mm"] = lambda: torch._int_mm(x8, w8_t)
    x_f8, w_f8_t = x16.to(torch.float8_e4m3fn), w16.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    ops["fp8"] = lambda: torch._scaled_mm(x_f8, w_f8_t, one, one, out_dtype=torch.float16)
    ops["fp8_fast"] = lambda: torch._scaled_mm(x_f8, w_f8_t, one, one, out_dtype=torch.float16, use_fast_accum=True)
    row_a, row_b = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
    ops["fp8_rowwise"] = lambda: torch._scaled_mm(x_f8, w_f8_t, row_a, row_b, out_dtype=torch.float16)
    # name -> (run ours, run the reference, autotuned kernel); "_swap" / "_noswap" force the MMA orientation
    # (kernels.gemm_wxa8.swap_ab picks it otherwise), "_from_fp16" includes quantizing x (the eager path)
    ours = {}
    for bits in (8, 4, 2):
        w = weights[bits]
        variants = [("", x8, None, None)]
        if bits == 8:
            variants += [("_swap", x8, True, False), ("_tma", x8, None, True), ("_from_fp16", x16, None, None)]
        if bits == 4:
            variants += [("_noswap", x8, False, None)]
        for suffix, x, swap, tma in variants:
            ours[f"w{bits}a8{suffix}"] = (
                lambda x=x, w=w, swap=swap, tma=tma: gemm_a8(x, w, ACT_SCALE, ACT_ZP, swap=swap, tma=tma),
                lambda x=x, w=w: reference.gemm_a8(x, w, ACT_SCALE, ACT_ZP),
                gemm_wxa8.gemm_a8_kernel,
            )
        ours[f"w{bits}a16"] = (
            lambda w=w: gemm_a16(x16, w),
            lambda w=w: reference.gemm_a16(x16, w),
            gemm_weight_only.gemm_a16_kernel,
        )
    for name, bits, backend in (("w8_dq", 8, "auto"), ("w4_dq", 4, "auto"), ("w2_dq", 2, "auto"),
                                ("w4_dq_inductor", 4, "torch")):  # fmt: skip
        fn = lambda x, w=weights[bits], backend=backend: linear_dequant(x, w, backend=backend)
        dequant = torch.compile(fn, dynamic=False)
        ours[name] = (
            lambda dequant=dequant: dequant(x16),
            lambda w=weights[bits]: reference.gemm_a16(x16, w),
            None,
        )
    act_scale = (x16.float().abs().amax() / fp8.FP8_MAX).reshape(())
    for bits in (4, 2):
        w = weights[bits]
        fn = lambda x, w=w: fp8.fp8_linear(
            x, w.codes_fp8("triton"), w.scale, 1 / act_scale, act_scale, use_scaled_mm=True
        )
        codes_fp8 = torch.compile(fn, dynamic=False)
        ours[f"w{bits}_fp8"] = (
            lambda codes_fp8=codes_fp8: codes_fp8(x16),
            lambda w=w: fp8.fp8_linear(
                x16, w.codes_fp8("torch"), w.scale, 1 / act_scale, act_scale, use_scaled_mm=False
            ),
            None,
        )
    row = {"M": M, "N": N, "K": K, "us": {}, "rel_err": {}, "errors": {}, "configs": {}}
    for name, fn in ops.items():
        try:
            row["us"][name] = gpu_time_us(fn, repeats)
        except Exception as e:  # noqa: BLE001 (a vendor op refusing a shape is a result, not a crash)
            row["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    for name, (fn, ref_fn, kernel) in ours.items():
        try:
            row["rel_err"][name] = rel_err(fn(), ref_fn())
            row["us"][name] = gpu_time_us(fn, repeats)
            if kernel is not None:
                row["configs"][name] = str(chosen_config(kernel, M, N, x16))
        except Exception as e:  # noqa: BLE001 (a kernel failing on one shape must not lose the others)
            row["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    if sweep_tiles:
        row["tile_us"] = {name: tile_sweep(*ours[name][::2], M, repeats) for name in sweep_tiles if name in ours}
    row["tops"] = {k: 2 * M * N * K / (v * 1e-6) / 1e12 for k, v in row["us"].items() if k != "actq"}
    return row


# the deployed UNet's linears after q/k/v fusion (mixdq.fuse): (M at 1024 px, N, K, count per UNet step). Width
# 1280: 60 transformer blocks (down 2x10, mid 10, up 3x10) and 12 proj_in / proj_out; width 640: 10 blocks
# (down 2x2, up 3x2) and 10; per block: to_qkv, attn1 / attn2 to_out, attn2 to_q, attn2 to_kv (77 text tokens),
# GEGLU in (8 x width), ff out
FP8_LOWBIT_SHAPES = [
    (1024, 1280, 1280, 192),
    (1024, 3840, 1280, 60),
    (1024, 10240, 1280, 60),
    (1024, 1280, 5120, 60),
    (77, 2560, 2048, 60),
    (4096, 640, 640, 40),
    (4096, 1920, 640, 10),
    (4096, 5120, 640, 10),
    (4096, 640, 2560, 10),
    (77, 1280, 2048, 10),
]
FP8_LOWBIT_OPS = ["fp16", "rowwise", "rowwise_fast", "unpack_rowwise", "fused", "fused_fast", "fused_other"]


def bench_fp8_lowbit(M: int, N: int, K: int, bits: int, repeats: int, dev: str = "cuda") -> dict:
    """GPU time (us) and error of each FP8_LOWBIT_OPS op on one shape with a random ``bits``-bit weight."""
    from kernels.gemm_fp8_lowbit import fp8_lowbit_linear, rule_config, swap_ab
    from kernels.tiles import device_sms

    g = torch.Generator(device=dev).manual_seed(0)
    x16 = torch.randn(M, K, device=dev, generator=g, dtype=torch.float16)
    w16 = torch.randn(N, K, device=dev, generator=g, dtype=torch.float16) / K**0.5
    q, s = reference.quantize_weight(w16, bits)
    w = PackedWeight.from_codes(q, s.float(), bits)
    act_scale = x16.float().abs().amax() / 448
    x = (x16.float() / act_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    out_scale = (w.scale * act_scale).float()
    codes_t = w.codes_fp8("triton").t()
    ones, scale_b = torch.ones(M, 1, device=dev), out_scale.reshape(1, N)
    rowwise = lambda fast, codes_t=codes_t: torch._scaled_mm(
        x, codes_t, ones, scale_b, out_dtype=torch.float16, use_fast_accum=fast
    )
    ops = {
        "fp16": lambda: F.linear(x16, w16),
        "rowwise": lambda: rowwise(False),
        "rowwise_fast": lambda: rowwise(True),
        "unpack_rowwise": lambda: rowwise(False, w.codes_fp8("triton").t()),
        "fused": lambda: fp8_lowbit_linear(x, w, out_scale),
        "fused_fast": lambda: fp8_lowbit_linear(x, w, out_scale, fast_accum=True),
        "fused_other": lambda: fp8_lowbit_linear(x, w, out_scale, swap=not swap_ab(M)),
    }
    ref = (x.float() @ w.codes().float().T) * out_scale
    row = {"M": M, "N": N, "K": K, "bits": bits, "us": {}, "rel_err": {}, "errors": {}}
    for name, fn in ops.items():
        try:
            if name != "fp16":
                row["rel_err"][name] = rel_err(fn(), ref)
            row["us"][name] = gpu_time_us(fn, repeats)
        except Exception as e:  # noqa: BLE001 (one op failing on one shape must not lose the others)
            row["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    sms = device_sms(x)
    row["configs"] = {"fused": str(rule_config(M, N, swap_ab(M), sms)), "swap": swap_ab(M),
                      "fused_other": str(rule_config(M, N, not swap_ab(M), sms))}  # fmt: skip
    return row


def fp8_lowbit_markdown(meta: dict, rows: list[dict]) -> str:
    """Per-shape GPU times and, per (px, bits), the sum over one UNet step with the shapes' counts."""
    fmt = lambda v: "—" if v is None else f"{v:.1f}"
    head = "| px | bits | M | N | K | count | " + " | ".join(FP8_LOWBIT_OPS) + " | fused err |"
    lines = [f"# Low-bit FP8 linears per shape — {meta['gpu']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · `{meta['command']}`", "",
             "GPU time per call (µs): CUDA graph of back-to-back calls, median of replays. — = not run (see JSON).",
             "Sums: every low-bit linear of the step at this bit width (a mixed config lies between the two).", "",
             head, "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
    for r in rows:
        cells = [fmt(r["us"].get(c)) for c in FP8_LOWBIT_OPS]
        err = r["rel_err"].get("fused")
        lines.append(f"| {r['px']} | {r['bits']} | {r['M']} | {r['N']} | {r['K']} | {r['count']} | "
                     + " | ".join(cells) + f" | {'—' if err is None else f'{err:.1e}'} |")  # fmt: skip
    lines += ["", "| px | bits | " + " | ".join(f"{c} (ms/step)" for c in FP8_LOWBIT_OPS) + " |",
              "|" + "---|" * (2 + len(FP8_LOWBIT_OPS))]  # fmt: skip
    for px, bits in sorted({(r["px"], r["bits"]) for r in rows}):
        group = [r for r in rows if (r["px"], r["bits"]) == (px, bits)]
        sums = [fmt(sum(r["us"][c] * r["count"] for r in group) / 1000) if all(c in r["us"] for r in group) else "—"
                for c in FP8_LOWBIT_OPS]  # fmt: skip
        lines.append(f"| {px} | {bits} | " + " | ".join(sums) + " |")
    return "\n".join(lines) + "\n"


def run_fp8_lowbit(args, meta: dict) -> None:
    """The ``--fp8-lowbit`` mode: every (px, bits, shape), a JSON line appended after each."""
    jsonl, md = Path(f"{args.out_prefix}.jsonl"), Path(f"{args.out_prefix}.md")
    jsonl.write_text("")
    rows = []
    for px in (int(p) for p in args.fp8_lowbit_px.split(",")):
        for bits in (4, 2):
            for M, N, K, count in FP8_LOWBIT_SHAPES:
                m = M if M == 77 else M * px**2 // 1024**2
                row = bench_fp8_lowbit(m, N, K, bits, args.repeats) | {"px": px, "count": count}
                rows.append(row)
                with jsonl.open("a") as f:
                    f.write(json.dumps(row | {"meta": meta}) + "\n")
                md.write_text(fp8_lowbit_markdown(meta, rows))
                print(f"{px}px W{bits} ({m},{N},{K}) " + " ".join(f"{k}={v:.1f}" for k, v in row["us"].items()),
                      row["errors"] or "", flush=True)  # fmt: skip
            torch.cuda.empty_cache()


def chosen_config(kernel, M: int, N: int, x: torch.Tensor):
    """The tile the launch used: the autotuner's pick with --autotune, else the default rule's."""
    from kernels.tiles import autotune_enabled, device_sms, rule_config

    if autotune_enabled():
        return getattr(kernel, "best_config", None)
    return rule_config(kernel, M, N, device_sms(x))


COLUMNS = ["fp16", "int8_mm", "fp8", "fp8_fast", "fp8_rowwise", "actq", "w8a8", "w8a8_swap", "w8a8_tma", "w8a8_from_fp16",
           "w4a8", "w4a8_noswap", "w2a8", "w8a16", "w4a16", "w2a16", "w8_dq", "w4_dq", "w2_dq", "w4_dq_inductor",
           "w4_fp8", "w2_fp8"]  # fmt: skip


def markdown(meta: dict, rows: list[dict]) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.1f}"
    lines = [
        f"# GEMM kernels per layer shape — {meta['gpu']}",
        "",
        f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · `{meta['command']}`",
        "",
        "GPU time per call (µs): CUDA graph of back-to-back calls, median of replays. — = not run (see JSON errors).",
        "",
        "| M | N | K | count | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (4 + len(COLUMNS)),
    ]
    for r in rows:
        cells = [fmt(r["us"].get(c)) for c in COLUMNS]
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['count']} | " + " | ".join(cells) + " |")
    unet = [r for r in rows if r["count"]]
    if unet:
        totals = [
            fmt(sum(r["us"][c] * r["count"] for r in unet) / 1000) if all(c in r["us"] for r in unet) else "—"
            for c in COLUMNS
        ]
        lines.append("| **UNet total (ms)** | | | | " + " | ".join(totals) + " |")
    lines += ["", f"Throughput in TOPS (% of the {H100_INT8_PEAK_TOPS:.0f} TOPS H100 dense int8 peak):", ""]
    tcols = [c for c in COLUMNS if c != "actq"]
    lines += ["| M | N | K | " + " | ".join(tcols) + " |", "|" + "---|" * (3 + len(tcols))]
    for r in rows:
        cells = [
            f"{r['tops'][c]:.0f} ({100 * r['tops'][c] / H100_INT8_PEAK_TOPS:.0f}%)" if c in r["tops"] else "—"
            for c in tcols
        ]
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    worst = max((e for r in rows for e in r["rel_err"].values()), default=float("nan"))
    lines += ["", f"Largest max|ours − reference| / max|reference| over all rows: {worst:.2e}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_prefix", type=Path, help="writes <prefix>.json and <prefix>.md")
    parser.add_argument("--px", type=int, choices=(1024, 512), default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-peak", action="store_true", help="skip the 8192^3 shape")
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="autotune our kernels per shape (MIXDQ_TRITON_AUTOTUNE=1) instead of "
        "the default tile rule: shows what the rule leaves on the table",
    )
    parser.add_argument("--shapes", help="comma-separated row indices to run (0-5 UNet shapes, 6 = 8192^3)")
    parser.add_argument(
        "--sweep-tiles", default="", help="comma-separated ops (e.g. w8a8,w4a8,w4a16) to time with every tile too"
    )
    parser.add_argument(
        "--fp8-lowbit",
        action="store_true",
        help="only the W4A8 / W2A8 FP8 paths: the fused kernel vs unpacking + cuBLAS FP8, at the deployed UNet's "
        "shapes (writes <prefix>.jsonl and <prefix>.md)",
    )
    parser.add_argument("--fp8-lowbit-px", default="512,1024", help="resolutions of --fp8-lowbit, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA GPU")
    import triton

    torch._dynamo.config.recompile_limit = 64  # one small compiled dequant function per shape and bit-width
    if args.autotune:
        import os

        from kernels.tiles import AUTOTUNE_ENV

        os.environ[AUTOTUNE_ENV] = "1"
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(["python", *sys.argv]),
        "px": args.px,
        "tiles": "autotuned per shape" if args.autotune else "default rule (kernels/tiles.py)",
        "timing": "CUDA graph of back-to-back calls, CUDA events, median of replays / iters",
        "act_scale": ACT_SCALE,
        "act_zp": ACT_ZP,
    }
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.fp8_lowbit:
        run_fp8_lowbit(args, meta)
        return
    # latent tokens scale with pixels; the 77 text tokens do not
    shapes = [(m if m == 77 else m * args.px**2 // 1024**2, n, k, c) for m, n, k, c in UNET_SHAPES]
    if not args.no_peak:
        shapes.append(PEAK_SHAPE)
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for M, N, K, count in shapes:
        sweep = tuple(filter(None, args.sweep_tiles.split(",")))
        row = bench_shape(M, N, K, args.repeats, sweep_tiles=sweep) | {"count": count}
        rows.append(row)
        print(
            f"({M},{N},{K}) " + " ".join(f"{k}={v:.1f}" for k, v in row["us"].items()), row["errors"] or "", flush=True
        )
        Path(f"{args.out_prefix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(f"{args.out_prefix}.md").write_text(markdown(meta, rows))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
