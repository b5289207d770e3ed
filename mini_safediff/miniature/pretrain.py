"""Pretrain the built-in tiny model from scratch on the UCI digits and write it to weights/.

    python -m mini_safediff.miniature.pretrain                      # weights/, seed 0, ~20 minutes on a CPU core
    python -m mini_safediff.miniature.pretrain --out runs/tiny --seed 1 --unet-steps 1000
    python -m mini_safediff.miniature.pretrain --unet-only --exclude-digits 7 --out weights/unseen

The model has Stable Diffusion's architecture (our UNet2DConditionModel, AutoencoderKL, CLIPTextModel and
the real CLIP tokenizer) at small widths, on 16x16 RGB digits and 4x8x8 latents. Stages, in order:
  1. VAE: reconstruction (MSE) plus a small KL term on the generator part of the digits; the latent scaling
     factor is then set, as for SD, so that the scaled latents have unit standard deviation.
  2. Text encoder and UNet together, from scratch, on the plain denoising loss (epsilon prediction, SD's
     noise schedule). Captions come from the training templates; a share of them is empty, so that the
     model also learns the unconditional prediction classifier-free guidance needs.
  3. The judge (judge.py), on the judge part only.
  4. Save in the diffusers layout in float16, load back in float32, generate every digit from the
     evaluation templates (never seen in training) and score them with the judge: samples.png,
     pretrain.json.
--exclude-digits drops those digits' images (and so their captions) from the UNet's training data only: the VAE
still sees every digit, as a shared autoencoder would. --unet-only loads the VAE, text encoder and judge of
--base (the built-in weights/) and trains a UNet alone, text encoder frozen, with the seed and settings that
--base's pretrain.json records: the `unseen` control (docs/miniature.md), a UNet that never saw the harmful digit,
loadable over the base with `--unet`. It writes unet/, samples.png and pretrain.json to --out.
The result depends only on the seed and the settings (for a given torch thread count, which changes float
summation order); no stage stops on a clock, since that would make the weights depend on the machine's speed.
On cores shared with other jobs, OMP_NUM_THREADS=1 is much faster than oversubscribed threads.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..images import grid, save_png
from ..io import atomic_folder, write_json
from ..models import cpu_speedups
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.config import config_to_dict
from ..models.loading import load_pipeline
from ..models.pipeline import BUILTIN_MODEL, Pipeline
from ..models.schedule import NoiseSchedule, SchedulerConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..models.weights import save_state_dict
from ..training.optim import EMA, lr_at
from ..training.steps import draw_noise_and_timesteps
from . import digits
from .judge import load_judge, save_judge, train_judge


@dataclass
class Settings:
    vae_channels: tuple = (32, 64)  # two levels: 16x16 images -> 8x8 latents
    unet_channels: tuple = (32, 64)  # ~1.1M parameters
    text_width: int = 64  # the 49,408-token embedding table is most of the text encoder: keep it narrow
    text_layers: int = 2
    vae_steps: int = 600
    unet_steps: int = 2000
    judge_steps: int = 1000
    batch_size: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against the per-pixel MSE
    uncond_share: float = 0.1  # captions dropped to "" for classifier-free guidance
    ema: float = 0.995  # the shadow forgets the random initial weights within a few hundred steps
    check_images: int = 8  # per digit, in the final check
    check_steps: int = 25
    check_guidance: float = 5.0


def model_configs(s: Settings) -> tuple[VAEConfig, UNetConfig, CLIPTextConfig]:
    levels = len(s.vae_channels)
    vae = VAEConfig(block_out_channels=list(s.vae_channels), down_block_types=["DownEncoderBlock2D"] * levels,
                    up_block_types=["UpDecoderBlock2D"] * levels, layers_per_block=1, norm_num_groups=8,
                    sample_size=digits.RESOLUTION)
    levels = len(s.unet_channels)
    latent_side = digits.RESOLUTION // 2 ** (len(s.vae_channels) - 1)
    unet = UNetConfig(sample_size=latent_side,  # what generate() reads: 16x16 images by default
                      block_out_channels=list(s.unet_channels), layers_per_block=1, norm_num_groups=8,
                      down_block_types=["CrossAttnDownBlock2D"] * levels, up_block_types=["CrossAttnUpBlock2D"] * levels,
                      cross_attention_dim=s.text_width, attention_head_dim=4)
    text = CLIPTextConfig(hidden_size=s.text_width, intermediate_size=4 * s.text_width, num_attention_heads=4,
                          num_hidden_layers=s.text_layers, projection_dim=s.text_width)
    return vae, unet, text


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1], as SafetyDataset reads the PNGs."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, s: Settings, generator: torch.Generator, progress: bool):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
    vae.train()
    bar = tqdm(range(s.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.vae_lr, s.vae_steps, "cosine", warmup=50)
        x = pixels[torch.randint(0, len(pixels), (s.batch_size,), generator=generator)]
        posterior = vae.encode(x)
        reconstruction = vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
        mse = F.mse_loss(reconstruction, x)
        (mse + s.kl_weight * kl).backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(pixels)
        mse = F.mse_loss(vae.decode(posterior.mean), pixels).item()
    vae.config.scaling_factor = round(1 / posterior.mean.std().item(), 5)
    return posterior.mean, posterior.std, mse


def denoiser_rows(labels: np.ndarray, exclude_digits=()) -> np.ndarray:
    """Indices of the generator images the UNet trains on: all but those of exclude_digits."""
    excluded = {int(d) for d in exclude_digits}
    if not excluded <= set(range(10)) or len(excluded) == 10:
        raise ValueError(f"exclude_digits must be digits 0..9, not all ten, got {list(exclude_digits)!r}")
    return np.flatnonzero(~np.isin(labels, sorted(excluded)))


def train_denoiser(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                   schedule: NoiseSchedule, latents: tuple, labels: np.ndarray, s: Settings,
                   generator: torch.Generator, progress: bool, train_text: bool = True) -> float:
    """UNet and text encoder trained jointly on ||eps - unet(x_t, t, text(caption))||^2 (train_text=False: the
    UNet alone, under a frozen text encoder); the EMA weights are what is kept. latents: the VAE posterior
    (mean, std) of every training image, times the scaling factor."""
    if not train_text:
        text_encoder.eval().requires_grad_(False)
    models = nn.ModuleDict({"unet": unet, **({"text_encoder": text_encoder} if train_text else {})}).train()
    optimizer = torch.optim.AdamW(models.parameters(), lr=s.unet_lr)
    ema = EMA(models, s.ema)
    mean, std = latents
    bar = tqdm(range(s.unet_steps), desc="unet+text" if train_text else "unet", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.unet_lr, s.unet_steps, "cosine", warmup=100)
        rows = torch.randint(0, len(labels), (s.batch_size,), generator=generator)
        templates = torch.randint(0, len(digits.TRAIN_TEMPLATES), (s.batch_size,), generator=generator).tolist()
        dropped = (torch.rand(s.batch_size, generator=generator) < s.uncond_share).tolist()
        texts = ["" if drop else digits.caption(digits.TRAIN_TEMPLATES[template], int(labels[row]))
                 for row, template, drop in zip(rows.tolist(), templates, dropped)]
        x0 = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)  # a posterior sample
        noise, t = draw_noise_and_timesteps(x0, schedule.config.num_train_timesteps, generator)
        prediction = unet(schedule.add_noise(x0, noise, t), t, text_encoder(tokenizer(texts)))
        loss = F.mse_loss(prediction, schedule.target(x0, noise, t))
        loss.backward()
        nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(models)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    models.load_state_dict(ema.shadow)
    models.eval().requires_grad_(False)
    return loss.item()


def check_generation(pipe: Pipeline, judge, s: Settings, seed: int, out: Path, progress: bool) -> dict:
    """check_images per digit from the evaluation templates (in turn), each image its own seed, drawn to
    out/samples.png (a row per digit). Returns the judge's accuracy per digit."""
    n = s.check_images
    prompts = [digits.eval_prompts(d)[i % len(digits.EVAL_TEMPLATES)] for d in range(10) for i in range(n)]
    images = pipe.generate(prompts, steps=s.check_steps, guidance=s.check_guidance, seed=seed, progress=progress)
    correct = judge.classify(images)[0].argmax(-1).reshape(10, n) == np.arange(10)[:, None]
    cell = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 16x16 is too small to look at
    save_png(grid(cell, cols=n), out / "samples.png",
             prompts=f"one row per digit 0-9, evaluation templates, {s.check_steps} DDIM steps, "
                     f"guidance {s.check_guidance}, seeds {seed}..")
    return {str(d): float(correct[d].mean()) for d in range(10)}


def save_fp16(pipe: Pipeline, out: Path) -> Pipeline:
    """Saves in float16 (the weights ship at half the size) and returns the saved model read back in float32."""
    pipe.to(dtype=torch.float16).save(out)
    return load_pipeline(out, device="cpu", dtype=torch.float32)


def pretrain(out=BUILTIN_MODEL, seed: int = 0, settings: Settings | None = None, progress: bool = True,
             exclude_digits=()) -> dict:
    s = settings or Settings()
    rows = denoiser_rows(digits.digits("generator")[1], exclude_digits)  # refused before any work
    out = Path(out)
    minutes, started = {}, time.time()

    def lap(stage):
        nonlocal started
        minutes[stage] = round((time.time() - started) / 60, 2)
        started = time.time()

    images, labels = digits.digits("generator")
    pixels = to_pixels(images)
    vae_config, unet_config, text_config = model_configs(s)
    torch.manual_seed(seed)  # initial weights
    vae, unet, text_encoder = AutoencoderKL(vae_config), UNet2DConditionModel(unet_config), CLIPTextModel(text_config)
    cpu_speedups.apply(unet, vae)  # pretraining runs on the CPU, like the loaded models
    embeddings = text_encoder.text_model.embeddings  # CLIP's initialisation: small, so that tokens no caption
    nn.init.normal_(embeddings.token_embedding.weight, std=0.02)  # uses stay near zero instead of random noise
    nn.init.normal_(embeddings.position_embedding.weight, std=0.01)
    generator = torch.Generator().manual_seed(seed)  # every random draw of the training loops

    mean, std, vae_mse = train_vae(vae, pixels, s, generator, progress)
    lap("vae")
    tokenizer, schedule = CLIPTokenizer.default(), NoiseSchedule(SchedulerConfig())
    scale = vae.config.scaling_factor
    loss = train_denoiser(unet, text_encoder, tokenizer, schedule, (mean[rows] * scale, std[rows] * scale),
                          labels[rows], s, generator, progress)
    lap("unet_and_text")
    judge, judge_info = train_judge(*digits.digits("judge"), seed=seed, steps=s.judge_steps, progress=progress)
    judge_info["generator_part_accuracy"] = judge.accuracy(images, labels)  # images the judge never saw either
    save_judge(judge, out, judge_info)
    lap("judge")

    pipe = save_fp16(Pipeline(unet, vae, text_encoder, tokenizer, schedule), out)
    accuracy = check_generation(pipe, judge, s, seed, out, progress)
    lap("check")
    report = {"seed": seed, "settings": asdict(s), "excluded_digits": sorted(set(map(int, exclude_digits))),
              "unet_training_images": len(rows), "minutes": minutes | {"total": round(sum(minutes.values()), 2)},
              "parameters_millions": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 3) for name, m in
                                      [("vae", pipe.vae), ("unet", pipe.unet), ("text_encoder", pipe.text_encoder)]},
              "vae_reconstruction_mse": round(vae_mse, 5), "vae_scaling_factor": scale,
              "final_denoising_loss": round(loss, 5), "judge": judge_info,
              "generation_accuracy_per_digit": accuracy,
              "generation_accuracy": float(np.mean(list(accuracy.values())))}
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def repository_path(path: Path) -> str:
    """The path relative to the repository when it lies inside it (weights/, not this machine's absolute path)."""
    root = BUILTIN_MODEL.parent.resolve()
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def pretrain_unet(out, base=BUILTIN_MODEL, exclude_digits=(), progress: bool = True) -> dict:
    """A UNet alone, under --base's VAE and frozen text encoder, by the recipe --base's pretrain.json records
    (seed and settings), on the generator images without exclude_digits. Writes out/unet (float16),
    out/samples.png (judged by --base's judge) and out/pretrain.json; returns the record."""
    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise ValueError(f"--out {out}: the UNet-only run would overwrite its own --base; give another folder")
    record = json.loads((base / "pretrain.json").read_text())
    seed = record["seed"]
    s = Settings(**{key: tuple(value) if isinstance(value, list) else value
                    for key, value in record["settings"].items()})
    started = time.time()
    pipe = load_pipeline(base, device="cpu", dtype=torch.float32)
    images, labels = digits.digits("generator")
    rows = denoiser_rows(labels, exclude_digits)
    with torch.no_grad():
        posterior = pipe.vae.encode(to_pixels(images[rows]))
    scale = pipe.vae.config.scaling_factor
    vae_config, unet_config, _ = model_configs(s)
    torch.manual_seed(seed)  # a VAE first, as in pretrain(): the UNet starts from the shipped UNet's initial weights
    AutoencoderKL(vae_config)
    unet = UNet2DConditionModel(unet_config)
    cpu_speedups.apply(unet)
    generator = torch.Generator().manual_seed(seed)
    loss = train_denoiser(unet, pipe.text_encoder, pipe.tokenizer, pipe.schedule,
                          (posterior.mean * scale, posterior.std * scale), labels[rows], s, generator, progress,
                          train_text=False)
    unet_minutes = round((time.time() - started) / 60, 2)
    started = time.time()
    with atomic_folder(out, marker="pretrain.json") as tmp:  # a crash never leaves a finished-looking folder
        write_json(tmp / "unet" / "config.json", config_to_dict(unet.config, "UNet2DConditionModel"))
        save_state_dict(unet.to(torch.float16).state_dict(), tmp / "unet" / "diffusion_pytorch_model.safetensors")
        pipe = load_pipeline(base, device="cpu", dtype=torch.float32, unet=tmp)  # the saved float16 weights
        accuracy = check_generation(pipe, load_judge(base), s, seed, tmp, progress)
        check_minutes = round((time.time() - started) / 60, 2)
        report = {"seed": seed, "settings": asdict(s), "base": repository_path(base),
                  "trained": "unet (text encoder frozen)",
                  "excluded_digits": sorted(set(map(int, exclude_digits))), "unet_training_images": len(rows),
                  "torch_threads": torch.get_num_threads(),
                  "minutes": {"unet": unet_minutes, "check": check_minutes,
                              "total": round(unet_minutes + check_minutes, 2)},
                  "parameters_millions": {"unet": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3)},
                  "final_denoising_loss": round(loss, 5), "generation_accuracy_per_digit": accuracy,
                  "generation_accuracy": float(np.mean(list(accuracy.values())))}
        write_json(tmp / "pretrain.json", report)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BUILTIN_MODEL), help="output folder (default: the built-in weights/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-digits", type=int, nargs="+", default=[],
                   help="digits whose images the UNet never trains on (default: none)")
    p.add_argument("--unet-only", action="store_true",
                   help="train a UNet alone over --base's VAE and text encoder, with the seed and settings its "
                        "pretrain.json records (no --seed or settings options then)")
    p.add_argument("--base", default=str(BUILTIN_MODEL), help="--unet-only: the model to train a UNet for "
                                                             "(default: the built-in weights/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = Settings()
    for f in fields(Settings):  # every setting is an option: --unet-steps 1000, --unet-channels 32 64, ...
        value = getattr(defaults, f.name)
        kind = type(value[0]) if isinstance(value, tuple) else type(value)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=value,
                       nargs="+" if isinstance(value, tuple) else None, help=f"(default: {value})")
    args = p.parse_args(argv)
    settings = Settings(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                           for f in fields(Settings)})
    if args.unet_only:
        if settings != defaults or args.seed != 0:
            raise ValueError(f"--unet-only takes its seed and settings from {args.base}/pretrain.json: give neither")
        report = pretrain_unet(args.out, args.base, args.exclude_digits, progress=not args.quiet)
    else:
        report = pretrain(args.out, args.seed, settings, progress=not args.quiet, exclude_digits=args.exclude_digits)
    print(json.dumps({key: report[key] for key in ("minutes", "excluded_digits", "generation_accuracy_per_digit")},
                     indent=2))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, a missing --base, a full disk: one line
        sys.exit(f"pretrain: {e}")
