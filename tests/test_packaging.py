"""`pip wheel .` builds a wheel with every package, the assets the product reads, and the `mixdq` console script.

Built offline with the environment's setuptools (--no-build-isolation); a couple of seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # setuptools builds in ./build unless told otherwise; a stale copy there would leak into later wheels
    cfg = build / "setup.cfg"
    cfg.write_text(f"[build]\nbuild_base = {build}\n[egg_info]\negg_base = {build}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        cwd=ROOT,
        check=True,
        env=os.environ | {"DIST_EXTRA_CONFIG": str(cfg), "PIP_NO_INPUT": "1"},
        timeout=120,
    )
    (path,) = out.glob("mixdq_studio-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_package_of_the_checkout(wheel):
    names = set(wheel.namelist())
    packages = [p.parent for p in ROOT.glob("mixdq/**/__init__.py")] + [ROOT / "kernels", ROOT / "studio"]
    for package in packages:
        sources = {str(f.relative_to(ROOT)) for f in package.glob("*.py")}
        assert sources and sources <= names, f"{package.relative_to(ROOT)}: missing {sorted(sources - names)[:3]}"
    assert not any(n.startswith(("tests/", "bench/")) or n == "app.py" for n in names)


def test_wheel_holds_the_assets_read_at_run_time(wheel):
    names = set(wheel.namelist())
    shipped = {str(f.relative_to(ROOT)) for f in (ROOT / "assets").rglob("*") if f.is_file()}
    assert shipped <= names
    for needed in (
        "assets/prompts.txt",  # calibration prompts
        "assets/tiny-sdxl/model_index.json",  # the embedded model
        "assets/tiny-sdxl/unet/diffusion_pytorch_model.safetensors",
        "assets/tiny-sdxl/sensitivity.csv",  # allocate's default source, the studio's table
        "assets/tiny-clip/open_clip_model.safetensors",  # the embedded CLIP judge
        "assets/sdxl-turbo/weight_sqnr.yaml",  # SDXL-Turbo's published data
    ):
        assert needed in names
    # mixdq finds them at <folder holding the mixdq package>/assets, which is where the wheel puts them
    assert "mixdq/models.py" in names


def test_wheel_declares_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text and "mixdq = mixdq.cli:main" in text
