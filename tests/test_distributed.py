"""Two gloo processes on CPU give exactly the single-process sweep table and activation ranges, and a job
killed midway finishes on restart without redoing finished evaluations.

Ranks are forked from the test process (the random pipeline and the imports are inherited, so a rank starts
in well under a second instead of re-importing torch and diffusers); each joins the group through the same
environment variables torchrun sets.
"""

import copy
import multiprocessing
import os
import socket
import time

import pandas as pd
import pytest
import torch

from mixdq.calibrate import calibrate
from mixdq.distributed import SINGLE, current, launched, process_group
from mixdq.sensitivity import distributed as sweep_distributed
from mixdq.sensitivity.distributed import parts_dir, read_parts, run_sweep_distributed
from mixdq.sensitivity.sweep import SweepRun, SweepSettings, run_sweep

PROMPTS = ("a red circle on the left", "a large blue square at the top")
# two quality layers (SQNR) and one content layer (SSIM: a sampling run per evaluation, the costly kind)
LAYERS = (
    "conv_in",
    "down_blocks.1.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
)
SETTINGS = SweepSettings(prompts=PROMPTS, height=64, width=64, layers=LAYERS)
WEIGHT_ONLY = SweepSettings(prompts=PROMPTS, height=64, width=64, layers=LAYERS, targets=("weight",))
CALIBRATION = {"prompts": list(PROMPTS), "num_inference_steps": 1, "height": 64, "width": 64, "progress": False}
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def pristine():
    """The random pipeline as a rank receives it: never calibrated nor wrapped in this process."""
    from mixdq.models import build_random_pipeline

    return build_random_pipeline(seed=0)


@pytest.fixture(scope="module")
def single(pristine):
    """One process: the ranges and the table the ranks must reproduce.

    On one thread, as each rank: CPU convolutions' float results change with the thread count.
    """
    pipe = copy.deepcopy(pristine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ranges = calibrate(pipe, **CALIBRATION)
        table, _ = run_sweep(pipe, ranges, SETTINGS, progress=False)
    finally:
        torch.set_num_threads(threads)
    return ranges, table


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank, world, port, pipe, cache, settings, out, calibrated, die_after):
    """One rank: what ``torchrun -m mixdq sensitivity`` runs, with its results saved to ``out``."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    if die_after is not None:  # the kill: this rank dies before starting its (die_after + 1)-th evaluation
        evaluate, calls = SweepRun.evaluate, []

        def dying(self, job):
            if len(calls) == die_after:
                os._exit(3)
            calls.append(job)
            return evaluate(self, job)

        SweepRun.evaluate = dying
    with process_group("cpu") as ctx:
        ranges = calibrate(pipe, **CALIBRATION) if calibrated else None
        evaluated = []
        table, _ = run_sweep_distributed(pipe, ranges, settings, cache, progress=False, evaluations=evaluated)
        torch.save({"ranges": ranges, "table": table, "evaluated": evaluated, "world": ctx.world_size}, out)


def _start(pipe, cache, settings, tmp_path, tag, calibrated=False, die=None):
    port = _free_port()
    procs = []
    for rank in range(2):
        die_after = die[1] if die is not None and die[0] == rank else None
        args = (rank, 2, port, pipe, cache, settings, tmp_path / f"{tag}-{rank}.pt", calibrated, die_after)
        procs.append(FORK.Process(target=_rank, args=args))
        procs[-1].start()
    return procs


def _join(procs, timeout=60.0):
    for proc in procs:
        proc.join(timeout)
        assert proc.exitcode == 0, f"a rank exited with {proc.exitcode}"


def test_two_ranks_give_the_single_process_ranges_and_table(pristine, single, tmp_path):
    ranges, table = single
    _join(_start(pristine, tmp_path / "cache", SETTINGS, tmp_path, "run", calibrated=True))
    results = [torch.load(tmp_path / f"run-{rank}.pt", weights_only=False) for rank in range(2)]
    for result in results:
        assert result["world"] == 2
        got = result["ranges"].ranges
        assert sorted(got) == sorted(ranges.ranges) == [4, 8]
        for bits, by_layer in ranges.ranges.items():
            assert sorted(got[bits]) == sorted(by_layer)
            for name, r in by_layer.items():
                assert torch.equal(got[bits][name], r), (bits, name)  # bit for bit
        pd.testing.assert_frame_equal(result["table"], table, check_exact=True)
    # every job evaluated exactly once, shared by both ranks (the queue hands out each index once)
    evaluated = results[0]["evaluated"] + results[1]["evaluated"]
    assert sorted(evaluated) == sorted(zip(table.layer, table.target, table.bit, strict=True))
    assert results[0]["evaluated"] and results[1]["evaluated"]
    # the merged table is the cache the single-process sweep reads; the part files are gone
    cached = list((tmp_path / "cache").glob("sensitivity-*.csv"))
    assert len(cached) == 1 and not parts_dir(cached[0]).exists()
    assert pd.read_csv(cached[0]).shape == table.shape


def test_killed_rank_resumes_without_redoing_evaluations(pristine, single, tmp_path):
    _, table = single
    expected = table[table.target == "weight"].reset_index(drop=True)
    cache = tmp_path / "cache"
    procs = _start(pristine, cache, WEIGHT_ONLY, tmp_path, "killed", die=(1, 2))
    procs[1].join(60)
    assert procs[1].exitcode == 3  # rank 1 died after two evaluations
    time.sleep(0.5)
    procs[0].kill()  # as torchrun's agent does with the survivors
    procs[0].join(10)
    (parts,) = cache.glob("sensitivity-*.parts")
    before = read_parts(parts)
    assert 2 <= len(before) < len(expected)  # the killed job left part of the work done
    finished = set(zip(before.layer, before.target, before.bit, strict=True))

    _join(_start(pristine, cache, WEIGHT_ONLY, tmp_path, "resumed"))
    results = [torch.load(tmp_path / f"resumed-{rank}.pt", weights_only=False) for rank in range(2)]
    evaluated = results[0]["evaluated"] + results[1]["evaluated"]
    assert len(evaluated) == len(expected) - len(before)  # nothing finished was redone
    assert not finished & set(evaluated)
    for result in results:
        pd.testing.assert_frame_equal(result["table"], expected, check_exact=True)


def test_part_rows_cut_short_are_ignored(tmp_path):
    part = tmp_path / "rank-0.csv"
    part.write_text("conv_in,quality,conv,conv_in,864,2,weight,sqnr,5.131929,0.1\nconv_in,quality,conv,conv_in,86")
    rows = read_parts(tmp_path)
    assert rows.to_dict("records") == [
        {
            "layer": "conv_in",
            "group": "quality",
            "kind": "conv",
            "block": "conv_in",
            "size": 864.0,
            "bit": 2,
            "target": "weight",
            "metric": "sqnr",
            "value": 5.131929,
            "seconds": 0.1,
        }
    ]
    with sweep_distributed._open_part(part) as handle:  # appending first drops the cut line
        handle.write("x\n")
    assert part.read_text().splitlines()[-1] == "x"


def test_single_process_context_without_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched()
    with process_group() as ctx:
        assert ctx is SINGLE and current() is SINGLE
        assert not ctx.distributed and ctx.is_main and ctx.broadcast("x") == "x"


def test_cli_refuses_single_process_commands_under_a_launcher(monkeypatch, capsys):
    from mixdq.cli import DISTRIBUTED_COMMANDS, main

    assert DISTRIBUTED_COMMANDS == {"calibrate", "sensitivity"}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="generate runs in one process"):
        main(["generate", "--prompt", "a red circle"])


def _load_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_sweep_cost.py"
    spec = importlib.util.spec_from_file_location("gpu_sweep_cost", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_cost_bench_tiny_run_and_scaling_table(tmp_path, monkeypatch):
    """bench/gpu_sweep_cost.py on CPU with the embedded model, so the GPU run does not die on a wiring bug."""
    import json
    import sys

    bench = _load_bench()
    out = tmp_path / "cost"
    monkeypatch.setattr(sys, "argv", ["gpu_sweep_cost.py", "--tiny", "--px", "64", "--prompts", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert len(rows) == 2 * 5  # one layer per group, 3 weight + 2 activation bits
    assert {r["metric"] for r in rows} == {"sqnr", "ssim"} and all(r["seconds"] > 0 for r in rows)
    assert sum(r["warmup"] for r in rows) == 2  # the first evaluation of each metric
    estimate = report["full_sweep_estimate"]
    assert estimate["evaluations"] == 264 * 5
    means = report["mean_seconds"]
    counts = estimate["layers"]
    assert estimate["seconds"] == pytest.approx(
        5 * (counts["quality"] * means["sqnr"] + counts["content"] * means["ssim"])
    )
    assert "| sqnr |" in out.with_suffix(".md").read_text()

    two = dict(report, world_size=2, sweep_seconds=report["sweep_seconds"] / 1.6, evaluations=10)
    (tmp_path / "two.json").write_text(json.dumps(two))
    bench.scaling([tmp_path / "two.json", out.with_suffix(".json")], tmp_path / "scaling")
    runs = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    assert [r["gpus"] for r in runs] == [1, 2]
    assert runs[1]["speedup"] == pytest.approx(1.6) and runs[1]["efficiency"] == pytest.approx(0.8)


def test_single_process_resumes_from_part_rows(pristine, single, tmp_path):
    """Without a launcher the same function is a resumable sweep: rows already in a part file are kept as is."""
    _, table = single
    expected = table[table.target == "weight"].reset_index(drop=True)
    pipe = copy.deepcopy(pristine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = []
        run_sweep_distributed(pipe, None, WEIGHT_ONLY, tmp_path / "first", progress=False, evaluations=first)
        assert len(first) == len(expected)
        (cached,) = (tmp_path / "first").glob("sensitivity-*.csv")
        parts = parts_dir(tmp_path / "cache" / cached.name)
        parts.mkdir(parents=True)
        done = expected.head(4).assign(value=-1.0, seconds=0.5)  # marked, to see that they are not recomputed
        done.to_csv(parts / "rank-3.csv", header=False, index=False)  # a rank of an earlier, larger job
        evaluated = []
        got, stats = run_sweep_distributed(
            pipe, None, WEIGHT_ONLY, tmp_path / "cache", progress=False, evaluations=evaluated
        )
    finally:
        torch.set_num_threads(threads)
    assert len(evaluated) == len(expected) - 4
    assert (got.value.head(4) == -1.0).all()
    pd.testing.assert_frame_equal(got.iloc[4:], expected.iloc[4:], check_exact=True)
    assert stats.evaluations == len(expected)
