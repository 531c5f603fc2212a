"""The UNet fine-tune of the embedded model: it learns, leaves the text encoders and VAE alone,
and writes a pipeline that loads like the shipped one (sharded for transfers, or in one file)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from mixdq.tiny.data import describe, sample_scenes, write_caption
from mixdq.tiny.train import Log, diffusion_loss, encode_latents, main, parse_args, train_unet

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-sdxl"


def _load(path: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float32, local_files_only=True)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_lowers_the_loss_on_a_fixed_batch_and_trains_the_unet_only(tmp_path):
    pipe = _load(ASSETS)
    rng = np.random.default_rng(0)
    scenes = sample_scenes(4, rng)
    captions = [write_caption(describe(s, rng), rng) for s in scenes.scenes]  # partial: what the shipped UNet lacks
    latents = encode_latents(pipe.vae, scenes, torch.device("cpu"))
    t = torch.tensor([999, 749, 499, 249])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = diffusion_loss(pipe, latents, captions, t, noise, train_text_encoders=False).item()
    frozen = {name: _state(getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2", "vae")}
    unet_before = _state(pipe.unet)

    args = parse_args(["--out", str(tmp_path), "--init", str(ASSETS), "--device", "cpu", "--steps", "20"])
    args.lr, args.ema, args.warmup, args.log_every = 1e-3, 0.0, 1, 1000  # no EMA: the last weights are the result
    train_unet(
        args, pipe, Log(tmp_path / "log.txt"), train_text_encoders=False, batches=itertools.repeat((scenes, captions))
    )
    with torch.no_grad():
        after = diffusion_loss(pipe, latents, captions, t, noise, train_text_encoders=False).item()

    assert after < 0.7 * before, (before, after)  # measured 0.520 -> 0.204 (CPU, one core)
    assert all(_same(_state(getattr(pipe, name)), state) for name, state in frozen.items())
    assert not _same(_state(pipe.unet), unet_before)


def test_finetune_writes_a_sharded_pipeline_that_loads_and_consolidates(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    common = ["--device", "cpu", "--batch", "2", "--log-every", "1"]
    main(["--init", str(ASSETS), "--out", str(sharded), "--steps", "2", "--max-shard-size", "12MB", *common])
    shards = sorted((sharded / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) == 2 and all(f.stat().st_size < 16 * 2**20 for f in shards)
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert "unet step 1 loss" in (sharded / "train_log.txt").read_text()

    shipped, tuned = _load(ASSETS), _load(sharded)
    assert {m.dtype for m in (tuned.unet, tuned.vae, tuned.text_encoder, tuned.text_encoder_2)} == {torch.float32}
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert _same(_state(getattr(tuned, name)), _state(getattr(shipped, name))), name
    diff = max((a - b).abs().max().item() for a, b in zip(tuned.unet.parameters(), shipped.unet.parameters()))
    assert 0 < diff < 0.05  # two small steps moved the UNet, not far

    main(["--init", str(sharded), "--out", str(single), "--steps", "0", *common])  # one file again, as shipped
    assert [f.name for f in (single / "unet").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert _same(_state(_load(single).unet), _state(tuned.unet))


def test_full_share_outside_0_1_is_rejected():
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--full-share", "1.5"])


def test_the_gpu_recipe_parses():
    from mixdq.tiny.finetune import RECIPE

    args = parse_args(["--out", "x", "--init", str(ASSETS), *RECIPE])
    assert args.batch == 128 and 0.0 < args.full_share < 1.0  # a batch as trained; both caption kinds


def test_pack_splits_the_finetune_files_into_parts_that_rebuild_them(tmp_path):
    import tarfile

    from mixdq.tiny import finetune

    model = tmp_path / "tiny-sdxl"
    (model / "unet").mkdir(parents=True)
    payload = bytes(range(256)) * (80 * 1024)  # 20 MiB: two parts
    (model / "unet" / "weights.bin").write_bytes(payload)
    (model / "metrics.json").write_text('{"a": 1}')
    parts = finetune.pack(model, tmp_path, "run_a")
    assert [p.name for p in parts] == ["run_a.tar.00", "run_a.tar.01"]
    assert all(p.stat().st_size <= finetune.PART_BYTES for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert tar.extractfile("run_a/unet/weights.bin").read() == payload
        assert tar.extractfile("run_a/metrics.json").read() == b'{"a": 1}'


def test_default_open_attributes_lay_out_the_completed_scenes():
    from mixdq.tiny.data import POSITIONS, SIZES, parse_caption
    from mixdq.tiny.train import training_batches

    batch, captions = next(training_batches(64, seed=0, full_share=0.0, open_attributes="default"))
    assert all(parse_caption(c).matches(s) for s, c in zip(batch.scenes, captions))
    for b, scene in enumerate(batch.scenes):  # the drawn layout is the completed scene's, up to jitter
        for i, obj in enumerate(scene.objects):
            assert abs(batch.center[b, i] - POSITIONS[obj.position]).max() < 0.02
            assert abs(batch.radius[b, i] / SIZES[obj.size] - 1) < 0.04
