"""Quantized checkpoint of the full-size SDXL UNet (random weights), on a GPU: on-disk bytes vs the deploy report,
peak host and GPU memory of loading the checkpoint vs deploying from FP16, and loaded vs fresh outputs.

    python bench/checkpoint_sdxl.py export DIR   # FP16 UNet -> MixDQ W4A8 (bench/configs) -> deploy -> save
    python bench/checkpoint_sdxl.py load DIR     # a fresh process: load_quantized_unet -> GPU -> same output?

Each phase prints one JSON line; run them as separate processes (peak host memory is per process).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from mixdq.config import PrecisionConfig
from mixdq.deploy import deploy
from mixdq.deploy.checkpoint import TENSOR_FILE, load_quantized_unet, save_quantized
from mixdq.inventory import layer_inventory
from mixdq.models import SDXL_UNET_CONFIG
from mixdq.quant import quantize_

CONFIG = ROOT / "bench" / "configs" / "sdxl_turbo_w4a8.json"
PX = 512


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def inputs(unet_config: dict, device: str) -> dict:
    """One guidance-free call at 512 px; fixed random text, so token 0 is the vector the BOS cache holds."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 77, unet_config["cross_attention_dim"], generator=g)
    pooled = torch.randn(
        1,
        unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"],
        generator=g,
    )
    latent = torch.randn(1, 4, PX // 8, PX // 8, generator=g)
    fp16 = {"dtype": torch.float16, "device": device}
    return {
        "sample": latent.to(**fp16),
        "timestep": torch.full((1,), 999.0, device=device),
        "encoder_hidden_states": hidden.to(**fp16),
        "added_cond_kwargs": {
            "text_embeds": pooled.to(**fp16),
            "time_ids": torch.tensor([[PX, PX, 0, 0, PX, PX]], **fp16),
        },
        "return_dict": False,
    }


@torch.no_grad()
def export(folder: Path) -> dict:
    unet_config = json.loads(SDXL_UNET_CONFIG.read_text())
    base = peak_host_mb()
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(unet_config).half().eval()
    config = PrecisionConfig.load(CONFIG, layer_inventory(unet))
    parts = {i.name: 1 if i.concat_split is None else 2 for i in layer_inventory(unet)}
    ranges = {8: {name: torch.tensor([[-4.0, 4.0]] * n) for name, n in parts.items()}}  # plausible, for timing
    quantize_(unet, config, ranges)
    args = inputs(unet_config, "cuda")
    unet(**args)  # fills the BOS cache with this text's token 0
    t = time.perf_counter()
    report = deploy(unet)
    deploy_s = time.perf_counter() - t
    out = unet(**args)[0].float().cpu()
    gpu_peak = torch.cuda.max_memory_allocated()
    t = time.perf_counter()
    save_quantized(unet, config, folder)
    save_s = time.perf_counter() - t
    save_file({"out": out}, folder / "reference_output.safetensors")  # bench-only, not part of the checkpoint
    path = folder / "unet" / TENSOR_FILE
    header = _header_len(path)
    data = path.stat().st_size - 8 - header
    unet_dir = sum(p.stat().st_size for p in (folder / "unet").iterdir())
    return {
        "phase": "export (FP16 UNet built on the GPU, quantize_, deploy, save)",
        "deploy": report.describe(),
        "report_weight_bytes": report.weight_bytes,
        "tensor_data_bytes": data,
        "data_vs_report_pct": 100 * (data / report.weight_bytes - 1),
        "unet_folder_bytes": unet_dir,
        "folder_vs_report_pct": 100 * (unet_dir / report.weight_bytes - 1),
        "safetensors_header_bytes": header,
        "gpu_peak_mb_fresh_deploy": gpu_peak / 2**20,
        "host_peak_delta_mb": peak_host_mb() - base,
        "deploy_s": deploy_s,
        "save_s": save_s,
    }


def _header_len(path: Path) -> int:
    with path.open("rb") as handle:
        return int.from_bytes(handle.read(8), "little")


@torch.no_grad()
def load(folder: Path) -> dict:
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    torch.zeros(1, device="cuda")  # CUDA context before the baseline
    base = peak_host_mb()
    t = time.perf_counter()
    unet = load_quantized_unet(folder)
    load_s = time.perf_counter() - t
    host_peak = peak_host_mb() - base
    torch.cuda.reset_peak_memory_stats()
    unet.to("cuda")
    gpu_static = torch.cuda.memory_allocated()
    out = unet(**inputs(unet_config, "cuda"))[0].float().cpu()
    reference = load_file(folder / "reference_output.safetensors")["out"]
    return {
        "phase": "load (fresh process: load_quantized_unet on the host, then .to('cuda'), one 512 px step)",
        "load_s": load_s,
        "host_peak_delta_mb_load": host_peak,
        "host_peak_delta_mb_total": peak_host_mb() - base,
        "gpu_static_mb": gpu_static / 2**20,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        "output_bit_identical": torch.equal(out, reference),
        "output_max_abs_diff": float((out - reference).abs().max()),
    }


if __name__ == "__main__":
    phase, folder = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"export": export, "load": load}[phase](folder)))
