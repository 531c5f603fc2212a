"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter (the other kernel tests on CPU) runs the kernels as Python, so it accepts code the
real compiler rejects: on an H200, two ``return`` statements of different tile shapes under a constexpr
``if`` failed to compile although every interpreted test passed. Triton ships ``ptxas``, so every code path
(weight bits x MMA orientation x K split) is compiled here to a cubin for sm_90 (tests/compile_sm90.py, in a
subprocess without TRITON_INTERPRET), and the largest tiles are checked against the 227 KB of shared memory
an H100 / H200 block may use; the fused low-bit FP8 GEMM's dots must lower to wgmma.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SHARED_MEMORY_PER_BLOCK = 227 * 1024


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode:
        pytest.fail(f"compile_sm90.py failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_path_compiles_for_hopper(compiled):
    failures = {name: result for name, result in compiled.items() if not isinstance(result, int)}
    assert not failures, "\n\n".join(f"{name}: {error}" for name, error in failures.items())
    # 6 A8 paths, 3 weight-only, 2 largest tiles (+ their one-stage sizes), the TMA GEMM, 4 unpack + 2 grouped,
    # 4 fused low-bit FP8 paths (+ their wgmma counts)
    assert len(compiled) == 28


def test_k_loop_is_software_pipelined(compiled):
    """Shared memory holds at least two K steps of the largest tiles: the loads are async copies overlapped
    with the MMAs. (Leaving the K bounds unspecialized once silently dropped this to a single stage: the
    K-masked loads could no longer vectorize, so nothing was pipelined.)"""
    for name in ("gemm_a8 largest tile", "gemm_a16 largest tile"):
        assert compiled[name] >= 2 * compiled[f"{name}: one stage"], name
    # the TMA GEMM: 128x128 int8 x tiles and 256x128 weight tiles (48 KB a K step), over 3 stages
    assert compiled["gemm_a8 TMA persistent"] >= 3 * (128 * 128 + 256 * 128)


def test_fp8_lowbit_dots_run_on_wgmma(compiled):
    """The unpacked-in-registers weight still reaches Hopper's FP8 wgmma (no mma.sync fallback): at least one
    instruction per K-slice of a chunk (int4: 2, int2: 4), in both orientations."""
    for bits in (4, 2):
        for swap in (False, True):
            count = compiled[f"fp8_lowbit W{bits} swap={swap}: e4m3 wgmma"]
            assert isinstance(count, int) and count >= 8 // bits, (bits, swap, count)


def test_tiles_fit_in_hopper_shared_memory(compiled):
    for name, shared in compiled.items():
        if isinstance(shared, int) and not name.endswith(("one stage", "wgmma")):
            # the unpacking kernels are elementwise: they may need no shared memory at all
            assert (0 if name.startswith("unpack") else 1) <= shared <= SHARED_MEMORY_PER_BLOCK, name
