"""README's shell workflow (the ```bash block under "## Workflow"), run as written, in order, in an empty folder,
on the embedded model, with a cold calibration cache.

Each logical line (backslash continuations joined) runs as its own process with its words exactly as README
has them. One line would take about 40 minutes on 2 CPU cores as written (the full sweep, 1,320 evaluations);
README's comment on it names the flags for a quick sample of it, and only that line gets them, appended: the
test fails if README stops saying them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mixdq.config import PrecisionConfig
from mixdq.inventory import inventory_fingerprint, inventory_from_unet_config
from mixdq.models import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from mixdq.sensitivity.table import read_table

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle on the left, on a blue background"
# command words -> the flags README's comment on that line names for a quick run
QUICK_FLAGS = {
    ("mixdq", "sensitivity"): "--num-prompts 2 --shard 0/40",
}


def workflow_lines(readme: str) -> list[str]:
    """The logical lines of the first ```bash block after "## Workflow" (continuations joined, comments kept)."""
    section = readme.split("\n## Workflow\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)[1]
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw
        if current.rstrip().endswith("\\"):
            current = current.rstrip()[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def command(line: str) -> list[str]:
    """The line's words without its comment, plus the quick-run flags its comment names (if any)."""
    words = shlex.split(line, comments=True)
    comment = line.partition(" #")[2]
    for key, flags in QUICK_FLAGS.items():
        if all(word in words for word in key):
            assert flags in comment, f"README's line {line!r} no longer names the quick flags {flags!r}"
            words += flags.split()
    return words


def test_the_workflow_block_is_what_this_test_runs():
    lines = workflow_lines((ROOT / "README.md").read_text())
    subcommands = [shlex.split(line, comments=True)[3] for line in lines]
    assert subcommands == ["calibrate", "sensitivity", "allocate", "allocate", "allocate", "generate", "compare"]
    assert all(line.startswith("python -m mixdq ") for line in lines)


def test_readme_workflow_runs_as_written(tmp_path):
    lines = workflow_lines((ROOT / "README.md").read_text())
    env = os.environ | {
        "MIXDQ_CACHE_DIR": str(tmp_path / "cache"),  # cold: the first command fills it
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),  # as an installed package would be
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this one
    }
    env.pop("OMP_NUM_THREADS", None)
    work = tmp_path / "work"
    work.mkdir()
    stderr, seconds = {}, {}
    for line in lines:
        words = command(line)
        started = time.perf_counter()
        done = subprocess.run(words, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        seconds[line] = time.perf_counter() - started
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        stderr[words[3]] = stderr.get(words[3], "") + done.stderr
    print(json.dumps({line[:60]: round(s, 1) for line, s in seconds.items()}, indent=1))

    # one calibration: sensitivity and generate read calibrate's cached ranges back
    assert "calibrating" in stderr["calibrate"]
    assert all("calibrating" not in stderr[c] for c in ("sensitivity", "generate", "compare"))
    summary = json.loads((work / "outputs" / "compare" / "compare.json").read_text())
    assert summary["deployed_vs_simulated"]["psnr"] > 40  # the deployed model renders what the simulation does
    inventory = inventory_from_unet_config(EMBEDDED_MODEL_DIR / "unet" / "config.json")
    layers = list(inventory.layers)
    table = read_table(work / "sens.csv")
    assert set(table["layer"]) <= {info.name for info in layers} and len(table) == -(-len(layers) * 5 // 40)
    for name in ("w4a8.json", "w4a8_fp8.json"):
        config = PrecisionConfig.load(work / name)
        config.validate(layers)  # made for the model `generate` loads
        assert config.model_id == EMBEDDED_MODEL_ID and config.fingerprint == inventory_fingerprint(layers)
    assert "k_selection" in PrecisionConfig.load(work / "w4a8.json").metadata["allocation"]  # the --select-k line
    assert PrecisionConfig.load(work / "w4a8_fp8.json").fp8
    slug = re.sub(r"[^a-z0-9]+", "-", PROMPT.lower()).strip("-")
    written = sorted(p.name for p in (work / "outputs").iterdir())
    assert written == [
        f"{slug}-seed0-fp.png",
        f"{slug}-seed0-quant.png",
        "compare",
    ]  # generate's PNGs, compare's folder
