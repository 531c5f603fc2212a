"""Bad input driven through the studio page's own callbacks (the ones Gradio calls): each answer is one line that
says what to do, and what the page showed before (allocation, images, loaded config) is kept."""

import json
from pathlib import Path

import gradio as gr
import pytest

from mixdq.allocate import BAND
from mixdq.config import PrecisionConfig
from mixdq.memory import average_weight_bits
from studio import services
from studio.services import PUBLISHED_LABEL
from studio.ui import MAX_SEED, ChosenConfig, StudioPage

SKIP = gr.skip()
PROMPT = "a large red circle on the left, on a blue background"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of the embedded model (loaded: Compare can generate), with its own and the published data."""
    from mixdq.models import load_pipeline
    from studio.sources import build_sources

    workspace, sources = build_sources(load_pipeline(device="cpu"), tmp_path_factory.mktemp("cache"))
    page = StudioPage(workspace, sources)
    page.demo = page.build()
    return page


@pytest.fixture(scope="module")
def own(page):
    return page.labels[0]


@pytest.fixture(scope="module")
def allocated(page, own):
    """A session that has allocated 4 average bits on the embedded model: (its config, its shown dict)."""
    shown = page.new_shown()
    out = page.allocate(own, "average bits", 4.0, 4.0, True, 8.0, True, 0.6, shown, exact=True)
    assert out[10] == "" and isinstance(out[4], ChosenConfig)
    return out[4], shown


def _upload(tmp_path: Path, name: str, text: str) -> dict:
    """Gradio's raw file data for an upload of ``text`` named ``name``, cached under a server-side temp name."""
    folder = tmp_path / f"gradio-cache-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    path = folder / "0f3a9c-upload"
    path.write_text(text)
    return {"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _import_refused(page, own, files, shown) -> str:
    before = json.dumps(shown, sort_keys=True, default=str)
    out = page.import_files(files, own, shown)
    assert len(out) == 10
    message = out[1]
    # nothing else changes: the config state, the Budget view, the sliders stay as they were
    assert all(value == SKIP for i, value in enumerate(out) if i != 1), out
    assert json.dumps(shown, sort_keys=True, default=str) == before
    assert "gradio-cache" not in message and "0f3a9c" not in message  # the user's file name, not the server's path
    assert "\n" not in message and len(message) <= 400
    return message


def test_import_refuses_malformed_json_with_the_users_file_name(page, own, allocated, tmp_path):
    _, shown = allocated
    message = _import_refused(page, own, [_upload(tmp_path, "my config.json", '{"format": ')], shown)
    assert message.startswith("my config.json is not valid JSON")


def test_import_refuses_duplicate_keys(page, own, allocated, tmp_path):
    _, shown = allocated
    text = '{"format": "mixdq-studio/precision-config", "schema_version": 1, "weight_bits": {}, "weight_bits": {}}'
    message = _import_refused(page, own, [_upload(tmp_path, "twice.json", text)], shown)
    assert message == "twice.json: key 'weight_bits' appears twice in one object; keep one."


def test_import_refuses_a_yaml_alias_bomb_quickly(page, own, allocated, tmp_path):
    import time

    _, shown = allocated
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = _upload(tmp_path, "bomb_weight.yaml", "\n".join(levels) + "\n")
    act = _upload(tmp_path, "bomb_act.yaml", "model.x: 8\n")
    started = time.perf_counter()
    message = _import_refused(page, own, [bomb, act], shown)
    assert time.perf_counter() - started < 2.0
    assert message.startswith("bomb_weight.yaml: yaml anchors and aliases (&, *) are not allowed")


def test_import_of_another_models_config_names_the_source_to_choose(page, own, allocated, tmp_path):
    _, shown = allocated
    turbo = services.published_source()
    config = PrecisionConfig.uniform(list(turbo.inventory.layers), 8, 8, model_id=turbo.model_id)
    message = _import_refused(page, own, [_upload(tmp_path, "turbo.json", config.to_json())], shown)
    assert message == (
        f"turbo.json was made for {turbo.model_id}: choose '{PUBLISHED_LABEL}' as the sensitivity data above, then "
        "import it again."
    )
    stranger = json.loads(config.to_json()) | {"fingerprint": "0123456789abcdef", "model_id": "someone/else"}
    message = _import_refused(page, own, [_upload(tmp_path, "else.json", json.dumps(stranger))], shown)
    assert message.startswith("else.json: this config was made for another model (someone/else")


def test_import_refuses_other_files_and_lone_or_mixed_files(page, own, allocated, tmp_path):
    _, shown = allocated
    message = _import_refused(page, own, [_upload(tmp_path, "notes.txt", "hello")], shown)
    assert message.startswith("notes.txt is not a config file: upload one .json config, or the two files")
    message = _import_refused(page, own, [_upload(tmp_path, "w4_weight.yaml", "model.x: 4\n")], shown)
    assert message == (
        "w4_weight.yaml: its partner w4_act.yaml is missing; a MixDQ yaml config is a weight and an activation file."
    )
    two = [_upload(tmp_path, "a.json", "{}"), _upload(tmp_path, "b.json", "{}")]
    assert _import_refused(page, own, two, shown).startswith("2 files (a.json, b.json): upload one .json config")
    assert _import_refused(page, own, [], shown).startswith("Choose a file first")


def test_import_of_a_yaml_pair_replaces_the_budget_view(page, own, allocated, tmp_path):
    """The pair the export writes, uploaded together: Compare and Export now use it and the Budget tab shows it."""
    chosen, _ = allocated
    shown = page.new_shown()
    page.allocate(own, "average bits", 4.0, 4.0, True, 8.0, True, 0.6, shown, exact=True)
    layers = list(page.source_of(own).inventory.layers)
    w6 = PrecisionConfig.uniform(layers, 8, 8, protected=chosen.config.protected)
    w6.weight_bits.update({n: 4 for n in list(w6.weight_bits)[::2]})
    weight_path, act_path = w6.save_mixdq_yaml(tmp_path, "mine", layers)
    files = [_upload(tmp_path, "mine_act.yaml", act_path.read_text())]
    files.append(_upload(tmp_path, "mine_weight.yaml", weight_path.read_text()))
    out = page.import_files(files, own, shown)
    imported, message, heatmap, _memory, _pareto, status, _shown, bits, mb, notice = out
    assert message.startswith("Loaded mine_act.yaml + mine_weight.yaml: ") and notice == ""
    names = [i.name for i in layers]
    for query in ("layer_weight_bits", "layer_act_bits"):
        assert [getattr(imported.config, query)(n) for n in names] == [getattr(w6, query)(n) for n in names]
    assert imported.name == "imported mine_act.yaml + mine_weight.yaml" and imported.label == own
    average = average_weight_bits(layers, w6)
    assert status.startswith("imported mine_act.yaml + mine_weight.yaml: ") and f"{average:.3f} average" in status
    assert heatmap != SKIP and bits == round(round(average / 0.05) * 0.05, 2)
    assert shown["inputs"]["bits"] == bits and shown["inputs"]["MB"] == mb
    # what Export writes now is the imported config, in the CLI's file names
    files, _ = page.export(imported, own)
    names = sorted(Path(f).name for f in files)
    assert [n.rsplit("_", 1)[-1] for n in names if n.endswith(".yaml")] == ["act.yaml", "weight.yaml"]
    back = PrecisionConfig.load(next(f for f in files if f.endswith("_weight.yaml")))
    assert [back.layer_weight_bits(n) for n in names] == [w6.layer_weight_bits(n) for n in names]


def test_budget_out_of_range_resets_the_box_and_keeps_the_allocation(page, own, allocated):
    _, shown = allocated
    for typed in (9.0, 2.0, 1.0, "abc", float("nan")):
        out = page.allocate(own, "average bits", typed, 4.0, True, 8.0, True, 0.6, shown, exact=True)
        assert all(value == SKIP for i, value in enumerate(out) if i not in (6, 10))
        assert out[6] == gr.update(value=4.0)  # the last valid budget
        assert out[10].startswith("The weight budget (average bits) must be a number from ")
        assert "the box is back at 4 and the allocation is unchanged" in out[10]
    out = page.allocate(own, "average bits", 4.0, 4.0, True, 9.5, True, 0.6, shown, exact=True)
    assert out[8] == gr.update(value=8.0) and out[10].startswith("The activation budget must be a number from 4 to 8")
    # a manual K the budget cannot meet: the feasible range, the allocation kept
    out = page.allocate(own, "average bits", 7.5, 4.0, True, 8.0, False, 2.0, shown, exact=True)
    assert out[10].startswith("Infeasible budget") and all(v == SKIP for v in out[:10])


def test_k_slider_moves_only_without_auto_k_and_the_band_is_explained(page):
    assert page.k_interactive(True) == gr.update(interactive=False)
    assert page.k_interactive(False) == gr.update(interactive=True)
    assert page.k_value.interactive is False  # auto K is on when the page opens
    assert f"within ±{BAND:g} bits of the target by design" in page.budget.info


@pytest.mark.parametrize(
    ("seed", "steps", "size", "expected"),
    [
        (2**40, 1, 64, f"The seed must be a whole number from 0 to {MAX_SEED:,}"),
        (-1, 1, 64, "The seed must be a whole number from 0 to"),
        (1.5, 1, 64, "The seed must be a whole number"),
        (0, 5, 64, "Steps must be a whole number from 1 to 4 (this few-step sampler takes no more); got 5."),
        (
            0,
            1,
            100,
            (
                "The resolution must be a multiple of 8 px (the model works on 8x smaller latents); 100 px is "
                "not: try 96 or 104 px."
            ),
        ),
        (0, 1, 4096, "The resolution must be a whole number from 64 to 256 (256 px is this device's limit)"),
    ],
)
def test_compare_refuses_bad_numbers_and_keeps_the_images(page, allocated, seed, steps, size, expected):
    chosen, _ = allocated
    out = page.compare(chosen, "uniform W8A8", PROMPT, seed, steps, size)
    assert out[:4] == (SKIP,) * 4 and out[4].startswith(expected), out[4]


def test_compare_on_published_data_says_the_next_step_once(page, own):
    shown = page.new_shown()
    turbo = page.allocate(PUBLISHED_LABEL, "average bits", 4.0, 1300.0, True, 8.0, True, 0.6, shown, exact=True)[4]
    out = page.compare(turbo, "current allocation", PROMPT, 0, 1, 64)
    assert out[:4] == (SKIP,) * 4
    assert out[4].startswith(f"The current allocation ({turbo.name}) is for stabilityai/sdxl-turbo, whose weights")
    assert out[4].endswith(
        f"choose '{own}' as the sensitivity data above and set a budget, or pick a uniform preset, then Generate again."
    )
    assert "architecture" not in out[4]  # no hashes
    assert page.compare(None, "current allocation", PROMPT, 0, 1, 64)[4].startswith("No allocation yet: choose")


def test_compare_names_config_and_seed_and_says_a_long_prompt_was_cut(page, own):
    # weights only: no calibration needed for this test
    chosen = page.allocate(own, "average bits", 4.0, 4.0, False, 8.0, True, 0.6, page.new_shown(), exact=True)[4]
    long_prompt = PROMPT + ", with a small green square" * 40
    (fp, quant), simulated, _diff, report, notice = page.compare(chosen, "current allocation", long_prompt, 7, 1, 64)
    assert fp.size == quant.size == simulated.size == (64, 64)
    assert report.startswith(f"**config**: {chosen.name} · **seed** 7  \n")
    assert (
        notice.startswith("The prompt is ") and "the text encoders read the first 77, so the end was ignored" in notice
    )
    assert f"note: {notice}" in report
    out = page.compare(chosen, "uniform W8A16 (weights only)", PROMPT, 7, 1, 64)
    assert out[4] == "" and out[3].startswith("**config**: uniform W8A16 (weights only) · **seed** 7")


def test_an_unexpected_error_is_one_line_and_keeps_the_state(page, own, allocated, monkeypatch):
    _, shown = allocated

    def broken(*args, **kwargs):
        raise RuntimeError("solver crashed\nbadly")

    monkeypatch.setattr(services, "allocate", broken)
    out = page.allocate(own, "average bits", 5.0, 4.0, True, 8.0, True, 0.6, shown, exact=True)
    assert out[:10] == (SKIP,) * 10
    assert out[10] == (
        "Something went wrong (RuntimeError: solver crashed badly); nothing was changed. The server log has the details."
    )
