"""The sensitivity sweep across the ranks of a ``torchrun`` job, balanced, resumable, merged into one table.

Balancing: content evaluations (a sampling run plus decoding) cost several times a quality one (one UNet
forward), so a fixed split leaves ranks idle. Every rank instead takes the next job from a shared counter
(``store.add`` on the process group's store is atomic), until the list is used up.

Resuming: each rank appends every finished row to its own part file, ``sensitivity-KEY.parts/rank-N.csv``
beside the cached table (flushed per row, so a killed rank loses at most the row it was computing). A restart
with the same provenance (any number of ranks) skips every job found in any part file. Rank 0 then merges the
rows into the table the single-process sweep writes: the same rows in the same order, the same cache files.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd
import torch.distributed as dist
from tqdm.auto import tqdm

from mixdq.distributed import DistContext, current
from mixdq.inventory import layer_inventory
from mixdq.numerics import fp32_numerics
from mixdq.sensitivity.sweep import (
    SweepRun,
    SweepSettings,
    SweepStats,
    cost_stats,
    provenance,
    read_cached,
    sweep_jobs,
    table_path,
    write_cached,
)
from mixdq.sensitivity.table import COLUMNS, validate_table

# A part-file row: the table's columns plus what the evaluation cost (for the merged stats).
PART_COLUMNS: tuple[str, ...] = (*COLUMNS, "seconds")
JOB_COLUMNS = ["layer", "target", "bit"]
# How often rank 0 refreshes the progress bar while it waits for the other ranks' last jobs.
POLL_SECONDS = 0.2


def parts_dir(path: Path) -> Path:
    """``sensitivity-KEY.parts/`` beside the cached table ``sensitivity-KEY.csv``."""
    return path.with_suffix(".parts")


def read_parts(directory: Path) -> pd.DataFrame:
    """Every complete row of every part file in ``directory`` (first copy of a job wins).

    A line cut short by a kill has the wrong number of fields or an unparsable number and is ignored.
    """
    rows = []
    for part in sorted(directory.glob("rank-*.csv")):
        with part.open(newline="") as handle:
            for fields in csv.reader(handle):
                if len(fields) != len(PART_COLUMNS):
                    continue
                try:
                    rows.append(_parse(fields))
                except ValueError:
                    continue
    table = pd.DataFrame(rows, columns=list(PART_COLUMNS))
    return table.drop_duplicates(JOB_COLUMNS, keep="first").reset_index(drop=True)


def _parse(fields: list[str]) -> tuple:
    layer, group, kind, block, size, bit, target, metric, value, seconds = fields
    # float(repr(x)) == x: values read back are bit-identical to the ones computed.
    return layer, group, kind, block, float(size), int(bit), target, metric, float(value), float(seconds)


def _open_part(path: Path):
    """This rank's part file for appending, with a line left cut short by a kill removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    return path.open("a", newline="")


@fp32_numerics()
def run_sweep_distributed(
    pipe,
    act_ranges,
    settings: SweepSettings,
    cache_dir: str | Path,
    progress: bool = True,
    act_ranges_key: str = "",
    ctx: DistContext | None = None,
    evaluations: list[tuple[str, str, int]] | None = None,
) -> tuple[pd.DataFrame, SweepStats]:
    """:func:`mixdq.sensitivity.sweep.run_sweep`'s table and stats, computed by all ranks of ``ctx``.

    Every rank must call it with the same arguments (``ctx``: default :func:`mixdq.distributed.current`);
    every rank gets the merged table. ``cache_dir`` must be one folder all ranks see (it holds the part files).
    In a single process it is the plain sweep made resumable (its queue lives in memory).
    ``evaluations``, when given, receives the jobs this rank evaluated (tests count them).
    """
    ctx = current() if ctx is None else ctx
    layers = layer_inventory(pipe.unet)
    prov = provenance(pipe, layers, settings, act_ranges_key)
    path = table_path(cache_dir, prov)
    cached = read_cached(path)
    if cached is not None:
        return cached
    jobs = sweep_jobs(layers, settings)
    part_path = parts_dir(path) / f"rank-{ctx.rank}.csv"
    part = _open_part(part_path)
    try:
        ctx.barrier()  # every rank has repaired its own part file before rank 0 reads them all
        pending = None
        if ctx.is_main:
            done = read_parts(parts_dir(path))
            finished = set(zip(done["layer"], done["target"], done["bit"].astype(int), strict=True))
            pending = [job for job in jobs if job not in finished]
        # one list, so that counter value i means the same job on every rank; a fresh key per call
        pending, key = ctx.broadcast((pending, uuid.uuid4().hex) if ctx.is_main else None)
        run = SweepRun(pipe, act_ranges, settings, layers)
        ctx.barrier()  # all ranks start taking jobs together
        started = time.perf_counter()
        _work(run, pending, part, ctx, key, progress, evaluations)
    finally:
        part.close()
    ctx.barrier()  # every part file is complete
    result = None
    if ctx.is_main:
        result = _merge(path, jobs, prov, run.reference.unet_forward_seconds, time.perf_counter() - started)
    return ctx.broadcast(result)


def _work(run: SweepRun, pending, part, ctx: DistContext, key: str, progress: bool, evaluations) -> None:
    """Take jobs from the shared counter until none are left; rank 0 shows the whole job's progress."""
    store = ctx.store if ctx.distributed else dist.HashStore()
    show = progress and ctx.is_main
    bar = tqdm(total=len(pending), desc=f"sensitivity ({ctx.world_size} ranks)", unit="eval", disable=not show)
    writer = csv.writer(part)
    try:
        while (index := store.add(f"{key}/next", 1) - 1) < len(pending):
            row, _, seconds = run.evaluate(pending[index])
            writer.writerow([*row[:-1], repr(row[-1]), repr(seconds)])
            part.flush()
            os.fsync(part.fileno())
            if evaluations is not None:
                evaluations.append(pending[index])
            _refresh(bar, store.add(f"{key}/done", 1))
        while ctx.is_main and (finished := store.add(f"{key}/done", 0)) < len(pending):
            _refresh(bar, finished)
            time.sleep(POLL_SECONDS)
        _refresh(bar, store.add(f"{key}/done", 0))
    finally:
        bar.close()


def _refresh(bar, finished: int) -> None:
    bar.n = finished
    bar.refresh()


def _merge(
    path: Path, jobs, prov: dict, unet_forward_seconds: float, seconds: float
) -> tuple[pd.DataFrame, SweepStats]:
    """The one table, in the single-process sweep's row order, written where that sweep caches it."""
    done = read_parts(parts_dir(path)).set_index(JOB_COLUMNS)
    missing = [job for job in jobs if job not in done.index]
    if missing:
        raise RuntimeError(f"sensitivity: {len(missing)} jobs have no row after the sweep, e.g. {missing[0]}.")
    rows = done.loc[jobs].reset_index()
    stats = cost_stats(list(zip(rows["metric"], rows["seconds"], strict=True)), unet_forward_seconds, seconds)
    table = validate_table(rows.loc[:, list(COLUMNS)])
    write_cached(path, table, prov, stats)
    shutil.rmtree(parts_dir(path))
    return table, stats
