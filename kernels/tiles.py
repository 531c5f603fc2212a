"""Tile choice for the Triton kernels: a wave-filling rule by default, Triton's autotuner on request.

Autotuning benchmarks every config for every new (M, N, K) before the first result. The SDXL UNet has a few
dozen GEMM shapes per resolution, so a cold autotune took minutes on an H200 -- longer than compiling the
whole FP16 UNet. By default we therefore pick a config without benchmarking: the largest tile whose grid
still gives every SM at least one tile (one full wave), else the config with the most tiles. Setting
``MIXDQ_TRITON_AUTOTUNE=1`` restores the exhaustive autotuner (each shape tuned once per process).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

AUTOTUNE_ENV = "MIXDQ_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1"


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """SMs of t's GPU (1 on CPU, where only Triton's interpreter runs and tile count does not matter)."""
    return sm_count(t.device.index or 0) if t.is_cuda else 1


def prune_by_m(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles much taller than M (M = 1 time-embedding linears, M = 77 text tokens)."""
    cap = max(16, triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= cap] or configs[-1:]


def tile_count(config: triton.Config, M: int, N: int) -> int:
    return triton.cdiv(M, config.kwargs["BLOCK_M"]) * triton.cdiv(N, config.kwargs["BLOCK_N"])


def pick_gemm_config(configs: list[triton.Config], M: int, N: int, sms: int) -> triton.Config:
    """Largest tile (then deepest K step) that fills one wave of ``sms`` SMs; else the one with most tiles."""
    by_size = sorted(
        configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]), reverse=True
    )
    for config in by_size:
        if tile_count(config, M, N) >= sms:
            return config
    return max(by_size, key=lambda c: (tile_count(c, M, N), c.kwargs["BLOCK_K"]))


def rule_config(autotuned: Any, M: int, N: int, sms: int) -> triton.Config:
    """The config the default rule launches an ``@triton.autotune`` kernel with at this shape."""
    return pick_gemm_config(prune_by_m(autotuned.configs, {"M": M}), M, N, sms)


def launch_gemm(
    autotuned: Any, grid: Callable[[dict], tuple[int, ...]], M: int, N: int, sms: int, *args: Any, **meta: Any
) -> None:
    """Launch an ``@triton.autotune`` kernel: autotuned when asked, else with :func:`rule_config`'s tile."""
    if autotune_enabled():
        autotuned[grid](*args, **meta)
        return
    autotuned.fn[grid](*args, **meta, **rule_config(autotuned, M, N, sms).all_kwargs())


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in GROUP_M-row groups, for L2 reuse (Triton tutorial 03)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // num_pid_in_group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_pid_in_group) % group_size, (pid % num_pid_in_group) // group_size
