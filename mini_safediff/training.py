"""Pieces shared by train.py and attack.py. The loops themselves stay flat in the scripts."""
import json
import math
from pathlib import Path

import torch

from .weights import atomic_write


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def encode_batch(pipe, batch: dict, generator: torch.Generator):
    """Images -> scaled latents x0 (sampled from the VAE posterior), texts -> CLIP hidden states."""
    pixels = batch["pixel_values"].to(pipe.device, pipe.dtype)
    latents = pipe.vae.encode(pixels).sample(generator=generator) * pipe.vae.config.scaling_factor
    return latents.float(), pipe.encode_prompts(batch["text"])


def draw_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator):
    """Drawn on the CPU from the run's own generator: the same numbers on every device and after resume."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, timesteps


class EMA:
    """Exponential moving average of the trained weights (float32 copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for key, value in model.state_dict().items():
            self.shadow[key].lerp_(value.float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict):
        self.decay, self.shadow = state["decay"], state["shadow"]


def save_checkpoint(checkpoint: dict, path) -> None:
    """One plain dict (tensors, numbers, strings), written atomically: a crash keeps the previous file."""
    atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(path) -> list:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_log(path, rows: list, append: bool = False) -> None:
    """log.jsonl, one row a step. Appends are flushed at once, so a crash loses no logged step."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if append:
        with open(path, "a") as f:
            f.write(text)
    else:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def start_or_resume(out: Path, resume: bool, unet, optimizer, generator) -> tuple[int, dict]:
    """Step 0 with a fresh log; or, with `resume` and a checkpoint in `out`, the checkpoint's step, with the UNet,
    the optimizer and the generator restored and the log cut back to that step. Returns (step, checkpoint),
    the checkpoint for the script's own extra state ({} when starting afresh)."""
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        unet.load_state_dict(checkpoint["unet"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        write_log(log_path, [row for row in read_log(log_path) if row["step"] <= checkpoint["step"]])
        print(f"resumed from {checkpoint_path} at step {checkpoint['step']}")
        return checkpoint["step"], checkpoint
    if resume:
        print(f"--resume: no {checkpoint_path} yet, starting from step 0")
    out.mkdir(parents=True, exist_ok=True)
    write_log(log_path, [])
    return 0, {}
