"""Compile every Triton kernel path for Hopper (sm_90) without a GPU; print JSON {case: shared bytes | error}.

Run by tests/test_kernels_compile_sm90.py in a subprocess without ``TRITON_INTERPRET`` (in the test session
the kernels are interpreted functions, which cannot be compiled).
"""

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {
    "a_params_ptr": "*fp32",
    "w_scale_ptr": "*fp32",
    "rowsum_ptr": "*i32",
    "bias_ptr": "*fp32",
    "out_ptr": "*fp16",
    "x_ptr": "*fp16",
}


def compile_for_hopper(kernel, config: triton.Config, pointer_types: dict, **constexprs) -> int:
    """Shared memory bytes of ``kernel`` compiled for sm_90 with ``config`` and ``constexprs``."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    # the JIT turns integer arguments equal to 1 into constants: the unit strides along K and along N
    unit_strides = {n: 1 for n in fn.arg_names if n.endswith(("_ak", "_wk", "_on", "_xc", "_oc"))}
    constexprs = constexprs | config.kwargs | unit_strides
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types and not name.endswith("_ptr"):  # e.g. TMA tensor descriptors
            signature[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            signature[name] = (POINTERS | pointer_types).get(name, "*i8")
        elif "scale" in name or name in ("inv_scale", "zp"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    indices = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    # what the JIT specializes at the UNet's shapes: 16-byte aligned pointers, sizes and row strides divisible
    # by 16 (without it loads are byte-wise, cannot use cp.async, and the K loop is not pipelined)
    # ... except what the kernel marks do_not_specialize (names, or indices in some Triton versions)
    unspecialized = {fn.arg_names[a] if isinstance(a, int) else a for a in getattr(fn, "do_not_specialize", ()) or ()}
    attrs = {}
    for i, n in enumerate(fn.arg_names):
        if n in constexprs or n in unspecialized:
            continue
        if isinstance(signature[n], tuple):  # a tuple argument: its pointers aligned, its ints left general
            attrs.update({(i, j): [["tt.divisibility", 16]] for j, t in enumerate(signature[n]) if t.startswith("*")})
        elif signature[n] != "fp32" and not signature[n].startswith("tensordesc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    source = ASTSource(fn=fn, signature=signature, constexprs=indices, attrs=attrs)
    return triton.compile(source, target=HOPPER, options=options)


def largest(configs: list[triton.Config]) -> triton.Config:
    """The config with the most shared-memory staging (stages x K step x (M + N))."""
    return max(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]))


def cases():
    from kernels.gemm_weight_only import gemm_a16_kernel
    from kernels.gemm_wxa8 import gemm_a8_kernel

    # a non-square tile: the two MMA orientations give differently shaped accumulators
    small = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3)
    a8 = {"a_ptr": "*i8", "w_ptr": "*i8"}
    a16 = {"a_ptr": "*fp16", "w_ptr": "*i8"}
    for bits in (8, 4, 2):
        for swap in (False, True):
            # the quantizers read from a tensor (compiled deployed layers) on the swapped cases
            flags = {
                "W_BITS": bits,
                "HAS_SPLIT": True,
                "HAS_BIAS": True,
                "RETURN_ACC": False,
                "SWAP_AB": swap,
                "ACT_FROM_PTR": swap,
            }
            yield f"gemm_a8 W{bits} swap={swap}", gemm_a8_kernel, small, a8, flags
        yield f"gemm_a16 W{bits}", gemm_a16_kernel, small, a16, {"W_BITS": bits, "HAS_SPLIT": True, "HAS_BIAS": True}
    flags = {
        "W_BITS": 8,
        "HAS_SPLIT": True,
        "HAS_BIAS": True,
        "RETURN_ACC": False,
        "SWAP_AB": False,
        "ACT_FROM_PTR": True,
    }
    yield "gemm_a8 largest tile", gemm_a8_kernel, largest(gemm_a8_kernel.configs), a8, flags
    flags = {"W_BITS": 8, "HAS_SPLIT": True, "HAS_BIAS": True}
    yield "gemm_a16 largest tile", gemm_a16_kernel, largest(gemm_a16_kernel.configs), a16, flags
    from kernels import gemm_a8_tma

    tma = gemm_a8_tma.GPU_CONFIG
    bm, bn, bk = tma["BLOCK_M"], tma["BLOCK_N"], tma["BLOCK_K"]
    descriptors = {"a_desc": f"tensordesc<i8[{bm}, {bk}]>", "w_desc": f"tensordesc<i8[{bn}, {bk}]>"}
    flags = {
        "HAS_BIAS": True,
        "ACT_FROM_PTR": True,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 8,
        "NUM_PROGRAMS": 132,
    }
    config = triton.Config({}, num_warps=tma["num_warps"], num_stages=tma["num_stages"])
    yield "gemm_a8 TMA persistent", gemm_a8_tma.gemm_a8_tma_kernel, config, descriptors, flags
    from kernels.unpack import unpack_dequant_kernel

    one = triton.Config({}, num_warps=4, num_stages=1)
    for bits in (4, 2):
        flags = {"BITS": bits, "BLOCK_N": 64, "SCALED": True}
        yield f"unpack_dequant W{bits}", unpack_dequant_kernel, one, {"p_ptr": "*u8"}, flags
        # the FP8 paths: bare codes written as e4m3 (fp8e4nv, which needs sm_89+)
        pointers = {"p_ptr": "*u8", "out_ptr": "*fp8e4nv"}
        yield f"unpack codes e4m3 W{bits}", unpack_dequant_kernel, one, pointers, dict(flags, SCALED=False)
    # the grouped unpacking: tuples of per-weight pointers, sizes and bit widths; codes in e4m3 or scaled fp16
    from kernels.unpack import unpack_group_kernel

    seg = 3
    grouped = {"data": ("*u8",) * seg, "scales": ("*fp32",) * seg, "n": ("i32",) * seg, "k": ("i32",) * seg,
               "stride_pn": ("i32",) * seg, "out_start": ("i32",) * seg, "tile_start": ("i32",) * (seg + 1),
               "bits": ("i32",) * seg}  # fmt: skip
    for out, scaled in (("*fp8e4nv", False), ("*fp16", True)):
        flags = {"NSEG": seg, "BLOCK_N": 64, "SCALED": scaled}
        yield f"unpack group {out[1:]}", unpack_group_kernel, one, grouped | {"out_ptr": out}, flags


def fp8_lowbit_cases():
    """The fused low-bit FP8 GEMM in both MMA orientations, at each orientation's largest tile."""
    from kernels.gemm_fp8_lowbit import fp8_lowbit_kernel

    pointers = {"x_ptr": "*fp8e4nv", "w_ptr": "*u8", "out_scale_ptr": "*fp32", "bias_ptr": "*fp16"}
    for swap in (False, True):
        config = largest([c for c in fp8_lowbit_kernel.configs if c.kwargs["SWAP"] == swap])
        for bits in (4, 2):
            flags = {"W_BITS": bits, "HAS_BIAS": True, "SWAP_AB": swap, "FAST_ACCUM": False}
            yield f"fp8_lowbit W{bits} swap={swap}", fp8_lowbit_kernel, config, pointers, flags


def e4m3_wgmma_count(ptx: str) -> int | str:
    """wgmma instructions on e4m3 operands in ``ptx``; an error string if any MMA fell back to ``mma.sync``."""
    if "mma.sync" in ptx:
        return "mma.sync in the PTX: the FP8 dot did not lower to wgmma"
    return ptx.count(".e4m3.e4m3 ")


def one_stage_bytes(config: triton.Config, x_bytes: int) -> int:
    """Shared memory of one K step's operand tiles: x ``[BM, BK]`` and an int8 weight ``[BN, BK]``."""
    k = config.kwargs
    return k["BLOCK_K"] * (k["BLOCK_M"] * x_bytes + k["BLOCK_N"])


def main() -> None:
    results = {}
    for name, kernel, config, pointers, flags in itertools.chain(cases(), fp8_lowbit_cases()):
        try:
            compiled = compile_for_hopper(kernel, config, pointers, **flags)
            results[name] = compiled.metadata.shared
            if name.startswith("fp8_lowbit"):
                results[f"{name}: e4m3 wgmma"] = e4m3_wgmma_count(compiled.asm["ptx"])
        except Exception as err:  # noqa: BLE001 (reported per case; the test names the failing path)
            results[name] = f"{type(err).__name__}: {err}"[-2000:]
        if name.endswith("largest tile"):
            results[f"{name}: one stage"] = one_stage_bytes(config, 2 if pointers["a_ptr"] == "*fp16" else 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
