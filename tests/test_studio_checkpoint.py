"""The studio presents what the library does for checkpoints and protected layers: the protected weights mode of
the Budget tab changes the allocation it shows and warns below the uniform width; Save quantized checkpoint writes
what load_quantized reloads bit for bit; app.py opens a checkpoint (generate only) and refuses a bad one in a line."""

import copy
import json
import re
import zipfile

import gradio as gr
import pytest
import torch

import app
from mixdq.deploy import deploy
from mixdq.deploy.checkpoint import MANIFEST_FILE, TENSOR_FILE, load_quantized
from mixdq.deploy.runner import swapped_unet
from studio import services
from studio.checkpoint_page import NO_FP16, CheckpointPage
from studio.services import PUBLISHED_LABEL
from studio.ui import ChosenConfig, StudioPage

SKIP = gr.skip()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of the embedded model (loaded), with its own and the published data."""
    from mixdq.models import load_pipeline
    from studio.sources import build_sources

    workspace, sources = build_sources(load_pipeline(device="cpu"), tmp_path_factory.mktemp("cache"))
    page = StudioPage(workspace, sources)
    page.demo = page.build()
    return page


def _allocate(page, label, bits, mode, acts=True):
    return page.allocate(label, "average bits", bits, 0.0, acts, 8.0, True, 0.6, page.new_shown(), mode, exact=True)


def _numbers(status: str) -> dict[str, float]:
    found = re.search(r"all layers ([\d.]+) bits, allocated layers ([\d.]+)", status)
    return {"overall": float(found[1]), "allocated": float(found[2])}


def test_protected_mode_changes_the_allocation_the_page_shows(page):
    own = page.labels[0]
    source = page.source_of(own)
    shown = {mode: _allocate(page, own, 4.0, mode) for mode in services.PROTECTED_MODES}
    numbers = {mode: _numbers(out[3]) for mode, out in shown.items()}
    weights = {mode: shown[mode][4].config for mode in shown}
    protected = source.protected
    assert protected
    # inside: 4.00 over every layer, the FP16 protected ones at 16, so the allocated layers get less than 4
    assert abs(numbers["inside"]["overall"] - 4.0) <= 0.02 + 1e-3
    assert numbers["inside"]["allocated"] < numbers["inside"]["overall"] - 0.01
    # outside: 4.00 over the allocated layers; memory still pays the protected FP16 weights (overall above 4)
    assert abs(numbers["outside"]["allocated"] - 4.0) <= 0.02 + 1e-3
    assert numbers["outside"]["overall"] > numbers["outside"]["allocated"] + 0.01
    # act_only: the protected layers' weights are allocated too, so both averages are the budget's
    assert all(weights["act_only"].layer_weight_bits(name) is not None for name in protected)
    assert all(weights["inside"].layer_weight_bits(name) is None for name in protected)
    assert abs(numbers["act_only"]["overall"] - numbers["act_only"]["allocated"]) < 1e-3
    assert "counted at 16 bits" in shown["inside"][3] and "not counted" in shown["outside"][3]
    assert "allocated too" in shown["act_only"][3]
    # the MB slider converts as each mode counts: outside's 4 bits cost more MB than inside's
    assert source.bits_to_mb(4.0, "outside") > source.bits_to_mb(4.0, "inside")
    for mode in services.PROTECTED_MODES:
        assert source.mb_to_bits(source.bits_to_mb(4.0, mode), mode) == pytest.approx(4.0, abs=1e-9)
    assert shown["inside"][10] == ""  # no warning at 4 bits
    refused = _allocate(page, own, 4.0, "fp32")
    assert refused[:10] == (SKIP,) * 10 and "not one of ['inside', 'outside', 'act_only']" in refused[10]


def test_eight_bits_inside_says_layers_went_below_eight(page):
    label = PUBLISHED_LABEL if PUBLISHED_LABEL in page.labels else page.labels[0]
    top = page.source_of(label).weight_range_bits("inside")[1]
    bits = 8.0 if top > 8.0 else math_floor(top)
    out = _allocate(page, label, bits, "inside", acts=False)
    assert out[10].startswith(f"weight budget {bits:.2f} bits counts the")
    assert "below 8 bits" in out[10] and "outside" in out[10] and "act_only" in out[10]
    low = int(re.search(r"(\d+) of them are below 8 bits", out[10])[1])
    assert low == sum(b < 8 for b in out[4].config.weight_bits.values()) > 0
    outside = _allocate(page, label, 8.0, "outside", acts=False)
    assert outside[10] == "" and set(outside[4].config.weight_bits.values()) == {8}
    if label == PUBLISHED_LABEL:  # no SDXL-Turbo weights here: nothing to save, and the page says what to do
        refused = page.save_checkpoint(out[4])
        assert refused[0] == SKIP and "whose weights are not loaded here" in refused[1]


def math_floor(value: float) -> float:
    return int(value / services.BITS_STEP) * services.BITS_STEP


@pytest.fixture(scope="module")
def saved(page, tmp_path_factory):
    """A 4-bit weight allocation of the embedded model saved with the Export tab's button (activations FP16: the
    calibration a W4A8 checkpoint needs takes minutes on 2 cores; tests/test_checkpoint.py covers saved ranges)."""
    own = page.labels[0]
    chosen = _allocate(page, own, 4.0, "inside", acts=False)[4]
    assert isinstance(chosen, ChosenConfig)
    archive, status = page.save_checkpoint(chosen)
    return chosen, archive, status


def test_save_checkpoint_reloads_with_identical_unet_outputs(page, saved, tmp_path):
    chosen, archive, status = saved
    assert archive.endswith(".zip"), status
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
        names = zipped.namelist()
    folder = tmp_path / names[0].split("/")[0]
    assert archive.endswith(f"/{folder.name}.zip") and (folder / "unet" / MANIFEST_FILE).is_file()
    unet_mb = (folder / "unet" / TENSOR_FILE).stat().st_size / 1e6
    found = re.search(r"UNet tensors ([\d,.]+) MB \(config accounting ([\d,.]+) MB", status)
    assert float(found[1].replace(",", "")) == pytest.approx(unet_mb, abs=0.01)
    workspace = page.workspace
    assert workspace.pipe.unet is workspace.runner.fp_unet  # the FP16 UNet stays for Compare
    assert not any(t.is_meta for t in workspace.pipe.unet.parameters())

    loaded = load_quantized(folder, device="cpu")
    assert loaded.unet.mixdq_config.to_dict() == chosen.config.to_dict()
    # the freshly deployed model the checkpoint must reproduce
    pipe = workspace.pipe
    fresh = copy.deepcopy(pipe.unet)
    with swapped_unet(pipe, fresh):
        deploy(pipe, chosen.config, None)
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    size = fresh.config.sample_size
    inputs = {
        "sample": torch.randn(1, fresh.config.in_channels, size, size, generator=torch.Generator().manual_seed(1)),
        "timestep": torch.tensor(999),
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]])},
    }
    with torch.no_grad():
        assert torch.equal(loaded.unet(**inputs).sample, fresh(**inputs).sample)

    # the app opens the checkpoint: generate only, saying the FP16 weights are not there
    checkpoint = CheckpointPage(loaded, folder)
    checkpoint.build()
    assert "FP16 UNet weights are not in it" in NO_FP16
    image, notice = checkpoint.generate("a red circle", 0, 1, 64)
    assert image.size == (64, 64) and notice.startswith("Drawn as")
    refused = checkpoint.generate("a red circle", 0, 1, 68)
    assert refused[0] == SKIP and "multiple of 8" in refused[1]


def test_app_serves_the_checkpoint_page(saved, tmp_path, monkeypatch):
    _, archive, _ = saved
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
        folder = tmp_path / zipped.namelist()[0].split("/")[0]
    served = []
    monkeypatch.setattr(app, "_launch", lambda demo, args, started: served.append(demo) or 0)
    monkeypatch.setattr(app, "_block", lambda demo: 0)
    assert app.main(["--model", str(folder), "--device", "cpu"]) == 0
    (demo,) = served
    texts = [getattr(block, "value", None) for block in demo.blocks.values()]
    assert NO_FP16 in texts
    assert any(isinstance(t, str) and t.startswith("**config**: ") and "average weight bits" in t for t in texts)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert "weight budget (average bits)" not in labels  # no Budget tab: nothing to re-allocate from


def test_a_corrupted_checkpoint_is_one_line_and_exit_2(saved, tmp_path, capsys):
    _, archive, _ = saved
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
        folder = tmp_path / zipped.namelist()[0].split("/")[0]
    manifest = folder / "unet" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["format_version"] = 999
    manifest.write_text(json.dumps(data))
    assert app.main(["--model", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and MANIFEST_FILE in err[0]
