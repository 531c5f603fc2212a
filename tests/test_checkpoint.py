"""Quantized checkpoints (mixdq.deploy.checkpoint): a saved and reloaded deployed UNet computes what the freshly
deployed one computes, bit for bit on the CPU reference path; hostile files fail with one line naming file and
tensor, before any part of a pipeline is loaded; nothing is pickled."""

import copy
import json
import pickle
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixdq
from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.deploy import DEPLOYED_TYPES, deploy, fuse_qkv_projections
from mixdq.deploy.checkpoint import (
    MANIFEST_FILE,
    SHA_CHARS,
    TENSOR_FILE,
    CheckpointError,
    _sha256,
    load_quantized,
    load_quantized_unet,
    save_quantized,
)
from mixdq.inventory import layer_inventory
from mixdq.quant import QuantLayer

PROMPTS = ["a red circle above a blue square", "a green triangle left of a purple circle"]
ACT_ONLY = "mid_block.attentions.0.proj_out"
PROTECTED = ["conv_in", "conv_out"]
SPLIT_SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"  # a concat input: two activation quantizers


def checkpoint_config(unet) -> PrecisionConfig:
    """Every kind of layer a checkpoint holds: W8A8 / W4A8 / W2A8 integer linears and convs, weight-only
    (W4A16), activation-only (W16A8), protected FP16, FP8 W8A8 and W4A8 linears, BOS-aware to_k / to_v."""
    weight_bits, act_bits, fp8 = {}, {}, []
    for i, info in enumerate(layer_inventory(unet)):
        choices = (2, 4, 8) if info.group == "content" else (4, 8)
        weight_bits[info.name] = choices[i % len(choices)]
        if i % 5:
            act_bits[info.name] = 8
        if info.kind == "linear" and i % 5 and i % 7 == 0:
            fp8.append(info.name)
    del weight_bits[ACT_ONLY]
    act_bits[ACT_ONLY] = act_bits[SPLIT_SHORTCUT] = 8
    fp8 = [name for name in fp8 if name != ACT_ONLY]
    return PrecisionConfig(weight_bits=weight_bits, act_bits=act_bits, protected=PROTECTED, fp8=fp8)


def unet_inputs(pipe, batch: int = 2) -> dict:
    """UNet inputs whose text embedding holds the pipeline's BOS state (prompt) and the all-zeros negative."""
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False)
    embeds = torch.cat([embeds, torch.zeros_like(embeds)])[:batch]
    pooled = torch.cat([pooled, torch.zeros_like(pooled)])[:batch]
    config = pipe.unet.config
    sample = torch.randn(batch, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    return {
        "sample": sample,
        "timestep": torch.tensor(999),
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }


@pytest.fixture(scope="module")
def saved(random_pipe, tmp_path_factory):
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = random_pipe.model_id
    ranges = calibrate(pipe, PROMPTS, num_inference_steps=1, height=64, width=64, act_bits=(8,), progress=False)
    config = checkpoint_config(pipe.unet)
    report = deploy(pipe, config, ranges)
    folder = save_quantized(pipe, config, tmp_path_factory.mktemp("ckpt") / "tiny-w4a8")
    return types.SimpleNamespace(pipe=pipe, config=config, report=report, folder=folder)


def test_loaded_unet_is_bit_identical_to_the_fresh_deploy(saved):
    loaded = load_quantized_unet(saved.folder)
    fresh = dict(saved.pipe.unet.named_modules())
    kinds = set()
    for name, module in loaded.named_modules():
        if isinstance(module, (*DEPLOYED_TYPES, QuantLayer)):
            original = fresh[name]
            assert type(module) is type(original), name
            if isinstance(module, DEPLOYED_TYPES):  # packed codes only: no FP weight was made for it
                assert not list(module.parameters()) and not any(t.is_meta for t in module.buffers()), name
            kinds.add((type(module).__name__, getattr(module, "precision", None)))
            # every attribute its __init__ set (but the module mode: the loaded UNet is in eval mode)
            plain = {k: v for k, v in vars(original).items() if not k.startswith("_") and k != "training"}
            assert {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"} == plain, name
            buffers = dict(original.named_buffers())
            assert dict(module.named_buffers()).keys() == buffers.keys(), name
            assert all(torch.equal(t, buffers[k]) and t.dtype == buffers[k].dtype for k, t in module.named_buffers())
    assert {"DeployedFP8Linear", "DeployedFP8CodesLinear", "DeployedConv2d", "QuantLayer"} <= {k for k, _ in kinds}
    assert {("DeployedLinear", p) for p in ("W8A8", "W4A8", "W2A8", "W4A16")} <= kinds
    assert type(loaded.get_submodule("conv_in")) is torch.nn.Conv2d
    assert loaded.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k").bos_inputs is not None
    assert loaded.get_submodule(SPLIT_SHORTCUT).k_split is not None

    inputs = unet_inputs(saved.pipe)
    with torch.no_grad():
        expected = saved.pipe.unet(**inputs).sample
        got = loaded(**inputs).sample
    assert torch.equal(got, expected)


def test_load_quantized_makes_the_same_images_as_the_fresh_deploy(saved):
    pipe = mixdq.load_quantized(saved.folder, device="cpu")
    assert pipe.model_id == saved.pipe.model_id
    assert pipe.unet.mixdq_config.to_dict() == saved.config.to_dict()

    def image(p):
        return p(
            prompt=PROMPTS[1], num_inference_steps=1, guidance_scale=2.0, height=64, width=64,
            generator=torch.Generator().manual_seed(5), output_type="pt",
        ).images  # fmt: skip

    assert torch.equal(image(pipe), image(saved.pipe))


def test_on_disk_tensor_data_is_the_deploy_reports_bytes(saved):
    unet_dir = saved.folder / "unet"
    path = unet_dir / TENSOR_FILE
    header = int.from_bytes(path.read_bytes()[:8], "little")
    data = path.stat().st_size - 8 - header
    folder_bytes = sum(p.stat().st_size for p in unet_dir.iterdir())
    print(
        f"tensor data {data} B vs deploy report {saved.report.weight_bytes} B; header {header} B, manifest "
        f"{(unet_dir / MANIFEST_FILE).stat().st_size} B, unet folder {folder_bytes} B"
    )
    # every tensor the deployed UNet holds, but what an activation-only layer derives from its FP weight on
    # load (its weight scales of every bit, its current quantizer): measured -0.02 % here, 0.0 % on the
    # embedded model's MixDQ W4A8 config (no activation-only layer)
    derived = sum(
        t.numel() * t.element_size()
        for layer in saved.pipe.unet.modules()
        if isinstance(layer, QuantLayer)
        for name, t in layer.named_buffers(recurse=False)
        if name.startswith("weight_scale_") or name in ("_act_scale", "_act_zero_point")
    )
    assert derived and data == saved.report.weight_bytes - derived
    assert abs(data / saved.report.weight_bytes - 1) < 0.01
    # Measured: unet folder +7.1 % here (6.3 MB of tensors), +8.9 % on the embedded model (5.0 MB), all of it the
    # safetensors header and the manifest (~120 and ~180 B per tensor); ~0.1 % at SDXL size (1.3 GB, ~5,000
    # tensors).
    assert folder_bytes < 1.1 * saved.report.weight_bytes


def test_nothing_is_pickled(saved, monkeypatch):
    suffixes = {p.suffix for p in saved.folder.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".txt"}, suffixes
    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, lambda *a, **k: pytest.fail("unpickling during load"))
    assert load_quantized(saved.folder, device="cpu").unet is not None


def test_save_refuses_fused_and_undeployed_unets(saved, random_pipe, tmp_path):
    fused = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    w8 = PrecisionConfig.uniform(layer_inventory(fused.unet), 8, None)
    deploy(fused, w8)
    assert fuse_qkv_projections(fused) > 0
    with pytest.raises(ValueError, match="fused q/k/v projections; save the deployed UNet before"):
        save_quantized(fused, w8, tmp_path / "fused")
    with pytest.raises(ValueError, match="not deployed; run mixdq.deploy"):
        save_quantized(random_pipe, saved.config, tmp_path / "fp")
    other = PrecisionConfig.from_dict(saved.config.to_dict())
    changed = next(n for n, b in other.weight_bits.items() if b == 8 and n not in other.fp8 + PROTECTED)
    other.weight_bits[changed] = 4
    with pytest.raises(ValueError, match=f"layer '{changed}' holds W8A(8|16) but the config says otherwise"):
        save_quantized(saved.pipe, other, tmp_path / "other")
    assert not (tmp_path / "fused").exists() and not (tmp_path / "fp").exists()


# ---- hostile files ---------------------------------------------------------------------------------------------
def _header(path):
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return raw, length, json.loads(raw[8 : 8 + length])


def _rewrite(folder, change):
    """Rewrite the tensor file and its manifest consistently after ``change(tensors)``: only the model checks
    can catch what changed."""
    path, manifest_path = folder / "unet" / TENSOR_FILE, folder / "unet" / MANIFEST_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"] = {
        key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": _sha256(t)[:SHA_CHARS]}
        for key, t in tensors.items()
    }
    manifest_path.write_text(json.dumps(manifest))


def _edit_manifest(folder, change):
    path = folder / "unet" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


QWEIGHT = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.qweight"
ROWSUM = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight_rowsum"
NORM = "down_blocks.1.attentions.0.norm.weight"


def truncate(folder):
    path = folder / "unet" / TENSOR_FILE
    _, _, header = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-100])
    return last


def flip_header_dtype(folder):
    path = folder / "unet" / TENSOR_FILE
    raw, _, _ = _header(path)
    at = raw.index(f'"{QWEIGHT}":{{"dtype":"'.encode()) + len(f'"{QWEIGHT}":{{"dtype":"')
    path.write_bytes(raw[:at] + (b"I" if raw[at : at + 1] == b"U" else b"U") + raw[at + 1 :])
    return QWEIGHT


def flip_header_shape(folder):
    path = folder / "unet" / TENSOR_FILE
    raw, _, _ = _header(path)
    at = raw.index(f'"{NORM}":{{'.encode())
    at = raw.index(b'"shape":[', at) + 9
    path.write_bytes(raw[:at] + (b"7" if raw[at : at + 1] != b"7" else b"5") + raw[at + 1 :])
    return NORM


def flip_data_byte(folder):
    path = folder / "unet" / TENSOR_FILE
    raw, length, header = _header(path)
    start = 8 + length + header[QWEIGHT]["data_offsets"][0]
    path.write_bytes(raw[:start] + bytes([raw[start] ^ 0x10]) + raw[start + 1 :])
    return QWEIGHT


def missing_from_file(folder):
    tensors = load_file(folder / "unet" / TENSOR_FILE)
    del tensors[ROWSUM]
    save_file(tensors, folder / "unet" / TENSOR_FILE)
    return ROWSUM


def missing_everywhere(folder):
    _rewrite(folder, lambda tensors: tensors.pop(ROWSUM))
    return ROWSUM


def wrong_dtype(folder):
    _rewrite(folder, lambda tensors: tensors.update({ROWSUM: tensors[ROWSUM].to(torch.int64)}))
    return ROWSUM


def wrong_shape(folder):
    _rewrite(folder, lambda tensors: tensors.update({QWEIGHT: torch.cat([tensors[QWEIGHT]] * 2)}))
    return QWEIGHT


def wrong_shape_rest(folder):
    _rewrite(folder, lambda tensors: tensors.update({NORM: tensors[NORM][:-1].clone()}))
    return NORM


def another_model(folder):
    _edit_manifest(folder, lambda m: m.update(fingerprint="0123456789abcdef"))
    return "made for another model"


def future_format(folder):
    _edit_manifest(folder, lambda m: m.update(format_version=2))
    return "format_version 2"


def other_library(folder):
    _edit_manifest(folder, lambda m: m.update(library_version="0.9.0"))
    return "'0.9.0'"


def bad_layer_entry(folder):
    name = QWEIGHT.removesuffix(".qweight")
    _edit_manifest(folder, lambda m: m["layers"].update({name: "DeployedLinear"}))
    return name


def another_architecture(folder):
    path = folder / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "transformer_layers_per_block": [1, 2, 2]}))
    return "config.json builds architecture"


HOSTILE = {
    "truncated": (truncate, TENSOR_FILE, "truncated"),
    "flipped dtype byte in header": (flip_header_dtype, TENSOR_FILE, "dtype"),
    "flipped shape byte in header": (flip_header_shape, TENSOR_FILE, "shape"),
    "flipped data byte": (flip_data_byte, TENSOR_FILE, "SHA-256"),
    "tensor missing from the file": (missing_from_file, TENSOR_FILE, "is missing"),
    "tensor missing from file and manifest": (missing_everywhere, TENSOR_FILE, "the model needs it"),
    "wrong dtype": (wrong_dtype, TENSOR_FILE, "dtype int64, expected int32"),
    "wrong shape of a packed layer": (wrong_shape, TENSOR_FILE, "shape"),
    "wrong shape of an FP16 tensor": (wrong_shape_rest, TENSOR_FILE, "shape"),
    "manifest of another model": (another_model, MANIFEST_FILE, "architecture"),
    "manifest layer entry not an object": (bad_layer_entry, MANIFEST_FILE, "its entry needs a class"),
    "UNet config of another architecture": (another_architecture, MANIFEST_FILE, "made for another model"),
    "future format version": (future_format, MANIFEST_FILE, "this MixDQ Studio reads format 1"),
    "another library version": (other_library, MANIFEST_FILE, "export it again"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoint_fails_in_one_line_before_anything_loads(saved, tmp_path, monkeypatch, case):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "ckpt"
    shutil.copytree(saved.folder, folder)
    corrupt, file_name, problem = HOSTILE[case]
    named = corrupt(folder)
    calls = []
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointError) as info:
        load_quantized(folder, device="cpu")
    message = str(info.value)
    print(f"{case}: {message}")
    assert "\n" not in message and len(message) <= 600
    assert f"{folder}/unet/{file_name}" in message and named in message and problem in message
    assert calls == []  # the FP16 parts were never read: nothing half-loaded


def test_cli_export_writes_a_checkpoint_that_loads(random_pipe, tmp_path, capsys):
    """``python -m mixdq export`` of a weight-only config (no calibration needed) on a saved pipeline folder."""
    from mixdq.cli import main

    model = tmp_path / "model"
    random_pipe.save_pretrained(model)
    config = PrecisionConfig.uniform(layer_inventory(random_pipe.unet), 4, None, protected=PROTECTED)
    config.save(tmp_path / "w4.json")
    out = tmp_path / "w4-ckpt"
    argv = ["export", "--model", str(model), "--config", str(tmp_path / "w4.json"), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "quantized checkpoint ->" in capsys.readouterr().out
    pipe = load_quantized(out, device="cpu")
    assert pipe.unet.mixdq_config.to_dict() == config.to_dict()
    assert {m.precision for m in pipe.unet.modules() if isinstance(m, DEPLOYED_TYPES)} == {"W4A16"}

    images = tmp_path / "images"
    generate = ["generate", "--config", str(out), "--prompt", "a red circle", "--steps", "1", "--size", "64"]
    assert main([*generate, "--device", "cpu", "--out", str(images)]) == 0
    assert [p.name for p in images.iterdir()] == ["a-red-circle-seed0-checkpoint.png"]

    (tmp_path / "bad.json").write_text("{")
    assert main(["export", "--config", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "bad.json is not valid JSON" in capsys.readouterr().err


def test_the_caption_language_travels_with_the_checkpoint(saved, tmp_path):
    """A model that reads short prompts into its captions (the embedded one) still does after export."""
    from mixdq.models import TINY_SCENE_LANGUAGE

    assert mixdq.load_quantized(saved.folder, device="cpu").prompt_language is None
    saved.pipe.prompt_language = TINY_SCENE_LANGUAGE
    try:
        folder = save_quantized(saved.pipe, saved.config, tmp_path / "with-language")
    finally:
        del saved.pipe.prompt_language
    assert mixdq.load_quantized(folder, device="cpu").prompt_language == TINY_SCENE_LANGUAGE
