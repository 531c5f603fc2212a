"""Train the embedded tiny SDXL-architecture model on procedurally generated scenes.

    python -m mixdq.tiny.train --out assets/tiny-sdxl              # VAE, then UNet + text encoders
    python -m mixdq.tiny.train --out assets/tiny-sdxl --stage unet # reuse the VAE saved in --out/vae
    python -m mixdq.tiny.train --init assets/tiny-sdxl --out DIR   # fine-tune the shipped UNet only

Recipe: (1) a near-deterministic VAE (MSE + tiny KL), its scaling factor set from the latent std;
(2) the UNet and both text encoders jointly, v-prediction on SDXL's scaled-linear schedule, half
of the timesteps taken from those the trailing 1-4-step sampler visits (999, 749, 499, 249).
Because a caption fixes its image up to jitter, the denoiser at t = 999 regresses the image
itself, which is what makes 1-step sampling work. EMA weights are saved, in fp16.
Captions: a `--full-share` of canonical full captions, the rest partial descriptions in random
phrasings (`mixdq.tiny.data.training_pairs`), the open attributes drawn at random in the image or,
with `--open-attributes default`, at their defaults.
Fine-tuning (`--init`) trains the UNet alone: the text encoders and VAE stay frozen, so the
shipped tokenizer and text encoders stay valid and only the UNet's weights change.
Fixed seeds, data rendered on the training device, a log beside the weights.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from mixdq.tiny.components import IMAGE_SIZE, build_pipeline
from mixdq.tiny.data import OPEN_ATTRIBUTES, SceneBatch, layout, render, sample_scenes, training_pairs

SAMPLER_TIMESTEPS = (999, 749, 499, 249)  # EulerAncestral, trailing spacing, 4 steps (1 step: 999)
SAMPLER_TIMESTEP_PROBS = (0.4, 0.2, 0.2, 0.2)


class Log:
    """Prints and appends to a file, so a killed run still leaves its log."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.start = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def encode_prompts(
    captions: list[str],
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    text_encoders: tuple[CLIPTextModel, CLIPTextModel],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's `encode_prompt` without its no_grad: penultimate hidden states of both encoders,
    concatenated, and text_encoder_2's pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        out = encoder(ids.input_ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_encoder_2 (with projection) comes last: its text_embeds
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(batch: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline passes it: original size, crop (0, 0), target size."""
    return torch.tensor(
        [[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * batch, device=device, dtype=torch.float32
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1


def warmup_lr(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def train_vae(args: argparse.Namespace, log: Log) -> AutoencoderKL:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = build_pipeline().vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    log(
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {args.vae_steps} steps, batch {args.vae_batch}"
    )
    deadline = time.time() + args.vae_minutes * 60
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * warmup_lr(step, 100) * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x = to_unit_range(render(sample_scenes(args.vae_batch, rng), IMAGE_SIZE, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(rec.float(), x)
        kl = posterior.kl().mean()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.1f}")
        if time.time() > deadline:
            log(f"vae: time limit reached at step {step}")
            break
    vae.eval()
    with torch.no_grad():
        x = to_unit_range(render(sample_scenes(256, np.random.default_rng(args.seed + 1)), IMAGE_SIZE, device))
        z = vae.encode(x).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
        mse = F.mse_loss(vae.decode(z).sample.float(), x).item()
    log(
        f"vae done: held-out mse {mse:.5f}, latent std {z.float().std().item():.4f}, scaling_factor {vae.config.scaling_factor:.5f}"
    )
    return vae


def training_batches(
    batch: int,
    seed: int,
    full_share: float,
    object_counts: tuple[int, ...] | None = None,
    open_attributes: str = "random",
) -> Iterator[tuple[SceneBatch, list[str]]]:
    """Endless random scenes with their mixed captions (`mixdq.tiny.data.training_pairs`); captions
    draw from their own stream, so `full_share=1` gives the scene stream of a run without partial
    captions. With default open attributes, the completed scenes are laid out again (new jitter)."""
    scene_rng, caption_rng = np.random.default_rng(seed + 2), np.random.default_rng(seed + 3)
    while True:
        scenes = sample_scenes(batch, scene_rng, object_counts)
        drawn, captions = training_pairs(scenes.scenes, caption_rng, full_share, open_attributes)
        yield (scenes if open_attributes == "random" else layout(drawn, scene_rng)), captions


def encode_latents(vae: AutoencoderKL, batch: SceneBatch, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        latents = vae.encode(to_unit_range(render(batch, IMAGE_SIZE, device))).latent_dist.mode().float()
    return latents * vae.config.scaling_factor


def diffusion_loss(
    pipe: StableDiffusionXLPipeline,
    latents: torch.Tensor,
    captions: list[str],
    t: torch.Tensor,
    noise: torch.Tensor,
    train_text_encoders: bool,
) -> torch.Tensor:
    """v-prediction MSE of the pipeline's UNet on `latents` noised to timesteps `t` with `noise`."""
    device = latents.device
    a = pipe.scheduler.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with torch.set_grad_enabled(train_text_encoders and torch.is_grad_enabled()):
            embeds, pooled = encode_prompts(
                captions, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), device
            )
        time_ids = add_time_ids(len(captions), device)
        pred = pipe.unet(
            noisy, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    return F.mse_loss(pred.float(), target)


def sample_timesteps(batch: int, device: torch.device) -> torch.Tensor:
    """Half from the timesteps the trailing sampler visits, half uniform."""
    sampler_t = torch.tensor(SAMPLER_TIMESTEPS, device=device)
    sampler_p = torch.tensor(SAMPLER_TIMESTEP_PROBS, device=device)
    return torch.where(
        torch.rand(batch, device=device) < 0.5,
        sampler_t[torch.multinomial(sampler_p, batch, replacement=True)],
        torch.randint(0, 1000, (batch,), device=device),
    )


def train_unet(
    args: argparse.Namespace,
    pipe: StableDiffusionXLPipeline,
    log: Log,
    train_text_encoders: bool,
    batches: Iterator[tuple[SceneBatch, list[str]]] | None = None,
) -> StableDiffusionXLPipeline:
    """Train the UNet (and, if asked, both text encoders) of `pipe` in place; the EMA weights are
    left in it. `batches` defaults to `training_batches` of the arguments."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    batches = batches or training_batches(args.batch, args.seed, args.full_share, open_attributes=args.open_attributes)
    pipe.vae.to(device).eval().requires_grad_(False)
    trained = [pipe.unet] + ([pipe.text_encoder, pipe.text_encoder_2] if train_text_encoders else [])
    frozen = [] if train_text_encoders else [pipe.text_encoder, pipe.text_encoder_2]
    for model in frozen:
        model.to(device).eval().requires_grad_(False)
    nets = torch.nn.ModuleList(trained).to(device).train().requires_grad_(True)
    params = list(nets.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    log(
        f"UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M params; text encoders "
        f"{'trained' if train_text_encoders else 'frozen'}; {args.steps} steps, batch {args.batch}, "
        f"full captions {args.full_share:.0%}, open attributes {args.open_attributes}"
    )
    deadline = time.time() + args.unet_minutes * 60
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * warmup_lr(step, args.warmup)
        scenes, captions = next(batches)
        latents = encode_latents(pipe.vae, scenes, device)
        t = sample_timesteps(len(captions), device)
        loss = diffusion_loss(pipe, latents, captions, t, torch.randn_like(latents), train_text_encoders)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % args.log_every == 0 or step == args.steps - 1:
            log(f"unet step {step} loss {loss.item():.5f} ({(step + 1) / (time.time() - t0):.2f} steps/s)")
        if time.time() > deadline:
            log(f"unet: time limit reached at step {step}; saving the EMA weights of {step + 1} steps")
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    nets.eval()
    return pipe


def save_pipeline(pipe: StableDiffusionXLPipeline, out: Path, max_shard_size: str | None = None) -> None:
    """UNet and VAE in fp16 (diffusers upcasts them on a plain load); the text encoders stay fp32,
    because transformers 5 loads a checkpoint in its saved dtype and the pipeline needs one dtype.
    `max_shard_size` (e.g. "12MB") splits large weight files, for transfers with a file-size limit;
    `from_pretrained` reads the shards, and `--init DIR --steps 0` writes them back as one file."""
    pipe.to("cpu")
    for model in (pipe.unet, pipe.vae):
        model.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for model in (pipe.unet, pipe.vae):
        model.to(torch.float32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="pipeline directory to write (diffusers format)")
    p.add_argument("--stage", choices=("all", "vae", "unet"), default="all", help="training from scratch")
    p.add_argument("--init", type=Path, default=None, help="fine-tune this pipeline's UNet (text encoders, VAE frozen)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-7, help="KL weight: small, for a near-deterministic latent")
    p.add_argument("--vae-minutes", type=float, default=4.0, help="safety stop for the VAE stage")
    p.add_argument("--steps", type=int, default=8000, help="UNet steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--full-share", type=float, default=0.45, help="share of full captions; the rest are partial")
    p.add_argument(
        "--open-attributes",
        choices=OPEN_ATTRIBUTES,
        default="random",
        help="what a partial caption's image shows where the caption is silent (mixdq.tiny.data)",
    )
    p.add_argument(
        "--unet-minutes", type=float, default=9.0, help="safety stop for the UNet stage (EMA weights are saved)"
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--log", type=Path, default=None, help="default: OUT/train_log.txt")
    p.add_argument("--max-shard-size", default=None, help='split weight files above this size, e.g. "12MB"')
    args = p.parse_args(argv)
    if not 0.0 <= args.full_share <= 1.0:
        p.error(f"--full-share must be in [0, 1], got {args.full_share}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = Log(args.log or args.out / "train_log.txt")
    log(f"args: {vars(args)}")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device: {torch.cuda.get_device_name()}")
    if args.init is not None:
        pipe = StableDiffusionXLPipeline.from_pretrained(args.init, dtype=torch.float32, local_files_only=True)
        log(f"fine-tuning the UNet of {args.init}")
        save_pipeline(train_unet(args, pipe, log, train_text_encoders=False), args.out, args.max_shard_size)
        log(f"saved pipeline to {args.out}")
        return
    if args.stage in ("all", "vae"):
        vae = train_vae(args, log)
        vae.to("cpu", torch.float16).save_pretrained(args.out / "vae", safe_serialization=True)
        vae.float()
        log(f"saved {args.out / 'vae'}")
    else:
        vae = AutoencoderKL.from_pretrained(args.out / "vae", dtype=torch.float32)
    if args.stage in ("all", "unet"):
        pipe = build_pipeline()
        pipe.vae = vae
        save_pipeline(train_unet(args, pipe, log, train_text_encoders=True), args.out, args.max_shard_size)
        log(f"saved pipeline to {args.out}")


if __name__ == "__main__":
    main()
