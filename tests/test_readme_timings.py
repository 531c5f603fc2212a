"""README's CPU timing figures, re-measured and compared with bench/results/cpu_studio.json (which README cites).

Each figure is measured by bench/cpu_studio.py's own function, with fewer samples; see tests/benches.py for the
tolerance. Re-record with ``python bench/cpu_studio.py`` when a change makes a figure faster or slower on purpose.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.benches import ROOT, check_against_record, load_bench, load_record

RECORD = "cpu_studio"
REPEATS = 5


@pytest.fixture(scope="module")
def bench():
    return load_bench("cpu_studio")


@pytest.fixture(scope="module", autouse=True)
def threads_as_recorded(bench):
    """torch's threads as the record was made (as app.py), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(bench.app_threads())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def record():
    return load_record(RECORD)


@pytest.fixture(scope="module")
def sources(bench, tmp_path_factory):
    from studio import services

    return {"published": services.published_source(), "embedded": bench.embedded_source(tmp_path_factory.mktemp("c"))}


def test_the_record_has_every_figure_and_its_provenance(bench, record):
    assert set(record["figures"]) == set(bench.FIGURES)
    assert all(record["figures"][key]["samples"] >= 3 for key in bench.FIGURES)
    assert {"command", "machine", "commit", "date"} <= set(record["meta"])


@pytest.mark.parametrize("data", ["published", "embedded"])
@pytest.mark.parametrize("solver, figure", [("cbc", "exact_ilp"), ("approx", "greedy_auto_k")])
def test_allocation_solve_times(bench, record, sources, data, solver, figure):
    samples = bench.side_seconds(sources[data], solver, REPEATS)
    print(check_against_record(record, f"{figure}_{data}", samples))


def test_slider_callbacks(bench, record, sources):
    samples = bench.slider_seconds(sources["embedded"], REPEATS)
    for figure in ("slider_preview", "slider_solved", "slider_release"):
        print(check_against_record(record, figure, samples[figure]))


def test_first_heatmap_in_a_fresh_process(bench, record, tmp_path):
    print(check_against_record(record, "first_heatmap", [bench.first_heatmap_seconds(tmp_path)]))


def test_app_serves_its_page(bench, record, tmp_path):
    print(check_against_record(record, "app_serving", [bench.app_serving_seconds(tmp_path)]))


def test_compare_click(bench, record, tmp_path):
    seconds = bench.compare_seconds(tmp_path)
    for figure in ("compare_first", "compare_again"):
        print(check_against_record(record, figure, [seconds[figure]]))


def test_readme_quotes_the_record():
    """README's CPU rows cite the results file and quote its medians (ms or s, as README rounds them)."""
    readme = (ROOT / "README.md").read_text()
    assert "bench/results/cpu_studio.md" in readme
    figures = load_record(RECORD)["figures"]
    for figure in ("exact_ilp_published", "greedy_auto_k_published", "slider_solved", "slider_release"):
        quoted = f"{1000 * figures[figure]['median']:.0f} ms"
        assert re.search(rf"\b{re.escape(quoted)}\b", readme), f"README does not quote {figure} as {quoted}"
    for figure in ("app_serving", "first_heatmap", "compare_first"):
        quoted = f"{figures[figure]['median']:.1f} s"
        assert quoted in readme, f"README does not quote {figure} as {quoted}"
