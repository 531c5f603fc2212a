"""Process groups for ``torchrun`` / ``accelerate launch``: one context object every distributed step shares.

Launchers describe the job in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); :func:`process_group` reads it, joins the group (NCCL on CUDA, gloo on CPU) and leaves it
afterwards. Outside a launcher, or with one process, it yields the single-process context and touches nothing,
so every command runs the same code with or without a launcher. Library code asks :func:`current` instead of
taking the context as an argument everywhere: SPMD code must make the same calls on every rank anyway.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

LAUNCH_VARIABLES: tuple[str, ...] = ("RANK", "WORLD_SIZE")
# Ranks wait on each other at barriers while a slow rank finishes a content evaluation (a sampling run).
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``store`` is the group's key-value store (``None`` alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    store: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistContext()
_current = SINGLE


def current() -> DistContext:
    """The context :func:`process_group` entered, else the single-process one."""
    return _current


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as part of a job of several."""
    return all(v in os.environ for v in LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (torchrun and accelerate launch set it).")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer.") from None


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[DistContext]:
    """Join the launcher's process group for the duration of the block (no-op for a single process).

    ``device``: ``"cuda"`` or ``"cpu"``; default CUDA when available. On CUDA each rank uses GPU ``LOCAL_RANK``
    and the group uses NCCL; on CPU, gloo. The group is destroyed on the way out, errors included.
    """
    global _current
    if not launched():
        yield SINGLE
        return
    if _current.distributed:
        raise RuntimeError("process_group: a process group is already active in this process.")
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    # The store the group rendezvoused through (torchrun's agent store): shared counters need no extra server.
    store = dist.PrefixStore("mixdq/", dist.distributed_c10d._get_default_store())
    _current = DistContext(rank, world_size, local_rank, backend, store)
    try:
        yield _current
    finally:
        _current = SINGLE
        dist.destroy_process_group()


def main_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, so a job of N processes prints one report."""
    if current().is_main:
        print(*args, **kwargs)
