"""bench/gpu_unet.py end to end on the CPU with the tiny UNet, so the GPU run (10-minute calls, no time for
a second try) does not die on a wiring bug: random weights, calibration, BOS cache, deploy, timing, results."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["fp16_eager", "w8a8", "w4a16"]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_unet", ROOT / "bench" / "gpu_unet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_writes_a_row_per_variant_with_finite_numbers(tmp_path):
    bench = load_bench()
    argv = ["--tiny", "--device", "cpu", "--px", "64", "--variants", ",".join(VARIANTS), "--warmup", "1"]
    threads = torch.get_num_threads()
    # the tiny UNet's ops are too small to share; two OpenMP threads on a busy 2-core box spin (measured: 10 s
    # with one thread, over 2 min with two while other tests ran)
    torch.set_num_threads(1)
    try:
        bench.main([*argv, "--repeats", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    result = json.loads((tmp_path / "gpu_unet.json").read_text())
    assert result["meta"]["px"] == [64] and result["meta"]["device"] == "cpu"
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == VARIANTS
    for name, row in rows.items():
        assert row["status"] == "ok", row.get("error")
        assert row["px"] == 64 and row["method"] == "perf_counter" and row["samples"] == 3
        for key in ("ms", "ms_min", "ms_max", "vs_fp16_eager", "rel_err_vs_fp16"):
            assert math.isfinite(row[key]) and row[key] >= 0, (name, key, row[key])
        assert row["output_finite"]
        assert row["static_mb"] is None and row["peak_mb"] is None  # CUDA-only numbers
        assert row["vs_fp16_compiled"] is None  # the compiled baseline was not selected
    assert rows["fp16_eager"]["vs_fp16_eager"] == 1.0 and rows["fp16_eager"]["rel_err_vs_fp16"] == 0.0
    assert rows["fp16_eager"]["deploy"] is None

    for name, bits in (("w8a8", "W8A8"), ("w4a16", "W4A16")):
        deployed = rows[name]["deploy"]
        assert deployed["precisions"] == {bits: 264}  # every Linear/Conv2d of the embedded UNet, packed
        assert deployed["kernel_backend"] == "torch"
        assert 0 < deployed["weight_mb"] < deployed["fp16_mb"] and math.isfinite(deployed["ratio"])
        # deployed vs its own fake-quant model: the deploy numerics contract, through the whole UNet
        assert rows[name]["rel_err_vs_fake_quant"] < 0.1
    assert rows["w4a16"]["deploy"]["weight_mb"] < rows["w8a8"]["deploy"]["weight_mb"]

    table = (tmp_path / "gpu_unet.md").read_text()
    assert "| ours W8A8 (uniform) | 64 | perf_counter |" in table and "CPU reference path" in table


def test_kernel_categories_sort_profiler_names():
    """The --profile breakdown puts our kernels, attention, cuBLAS and Inductor's kernels in their own rows."""
    kernel_category = load_bench().kernel_category

    assert kernel_category("gemm_a8_kernel") == "ours: A8 GEMM"
    assert kernel_category("act_quant_kernel") == "ours: activation quantization"
    assert kernel_category("unpack_group_kernel") == "ours: weight unpacking"  # not an FP8 GEMM
    assert kernel_category("unpack_dequant_kernel") == "ours: weight unpacking"
    assert kernel_category("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_category("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "cuBLAS / CUTLASS GEMM"
    assert kernel_category("triton_per_fused_native_group_norm_silu_3") == "Inductor fused kernels"
    # names as seen in the H200 profile of 2026-11-28: Inductor's quantize+im2col kernels name our op
    fused_quant = "triton_poi_fused__to_copy__unsafe_view_add_clamp_clone_copy_fill_gemm_a8_lift_fresh_mul_permute"
    assert kernel_category(fused_quant) == "Inductor: quantize / im2col for our GEMMs"
    assert kernel_category("nvjet_sm90_hsh_80x128_64x8_2x1_v_bz_bias_TNN") == "cuBLAS / CUTLASS GEMM"
    conv = "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroupsize2x1x1"
    assert kernel_category(conv) == "convolution (cuDNN)"
    assert kernel_category("void at::native::elementwise_kernel<128, 2>") == "other"


def test_variant_names_parse_into_config_options_and_compile_mode():
    bench = load_bench()
    spec = bench.parse_variant("w4a8_fp8_dqconv_dqlow_regional")
    assert (spec.config, spec.options, spec.compile) == ("w4a8", {"fp8", "dqconv", "dqlow"}, "regional")
    assert bench.parse_variant("w8a8") == bench.VariantSpec("w8a8", frozenset(), None)
    assert bench.parse_variant("fp16_regional") is None  # a peer
    assert "4/2-bit linears dequant" in bench.variant_label("w4a8_dqlow_compiled")
    assert bench.parse_variant("w4a16_dqconv_dqlin_qkv_stages").options == {"dqconv", "dqlin", "qkv"}
    assert bench.parse_variant("w4a8_fp8all_dqconv_qkv_grp_compiled").options == {"fp8all", "dqconv", "qkv", "grp"}
    bad_names = ("w3a8", "w8a8_fast", "w8a8_fp8_fp8", "w4a8_dqlow_dqlin", "w4a8_fp8_fp8all", "w8a8_compiled_fp8")
    assert "grp" in bench.parse_variant("w4a16_dqconv_dqlin_qkv_grp_regional").options
    assert "fast" in bench.parse_variant("w8a8_fp8_dqconv_qkv_fast_compiled").options
    # grp: linears that unpack per call (fp8all, dqlow, dqlin); fast: FP8 GEMMs (fp8, fp8all)
    for bad in (*bad_names, "w4a8_fp8_grp", "w4a8_dqlow_fast"):
        try:
            bench.parse_variant(bad)
        except ValueError as err:
            assert "unknown variant" in str(err)
        else:
            raise AssertionError(f"{bad} was accepted")
    for name in bench.DEFAULT_VARIANTS:
        bench.variant_label(name)  # every default parses


def test_compile_breakdown_keeps_the_timers_that_grew_largest_first():
    bench = load_bench()
    before = {"bytecode_tracing": 1.0, "inductor": 2.0, "idle": 5.0}
    after = {"bytecode_tracing": 31.0, "inductor": 142.5, "idle": 5.0, "new_timer": 0.5}
    assert bench.compile_breakdown(before, after) == {"inductor": 140.5, "bytecode_tracing": 30.0, "new_timer": 0.5}
    assert list(bench.compile_breakdown(before, after, top=1)) == ["inductor"]


def test_rewarm_recompiles_after_a_dynamo_reset_and_reads_compile_modes():
    """--rewarm times a second warm-up: the compiled step must really compile again (not reuse the graph)."""
    from torch._dynamo.testing import CompileCounter

    bench = load_bench()
    assert [bench.spec_compile(n) for n in ("fp16_compiled", "w4a8_fp8all_qkv_regional", "w8a8", "torchao")] == [
        "compiled",
        "regional",
        None,
        None,
    ]
    counter = CompileCounter()
    step = torch.compile(lambda x: torch.relu(x) + 1, backend=counter)
    x = torch.randn(4)
    step(x)
    step(x)
    assert counter.frame_count == 1
    seconds = bench.rewarm_seconds(lambda: step(x), torch.device("cpu"))
    assert counter.frame_count == 2 and 0 <= seconds < 60
