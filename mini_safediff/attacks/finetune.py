"""Malicious fine-tuning, the paper's threat: the plain diffusion loss (eps or v, as the model's scheduler says) on
harmful rows, of the whole UNet or of LoRA adapters on its attention projections (lora.py). `attack.py finetune`
runs the loop; this file is what the loop trains, what one step draws, and how a snapshot of the attacked model
is saved.

    params = attacked_parameters(pipe.unet, lora_rank, lora_alpha, seed)
    batch = attack_batch(pipe, dataset, batch_size, index, seed, generator)
    loss = diffusion_loss(pipe.unet(batch.x_t, batch.t, batch.context, **batch.added), batch.x0, batch.noise,
                          batch.t, pipe.schedule)
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.weights import save_state_dict
from ..training.data import load_batch
from ..training.steps import draw_noise_and_timesteps, encode_batch
from .lora import add_lora, lora_state_dict, merged_state_dict


def attacked_parameters(unet, lora_rank: int, lora_alpha: float | None, seed: int) -> list:
    """What the attacker trains: LoRA adapters of rank lora_rank (seeded), or every UNet weight with rank 0."""
    if lora_rank:
        return add_lora(unet, lora_rank, lora_alpha, seed)
    return list(unet.requires_grad_(True).parameters())


@dataclass
class AttackBatch:
    x_t: torch.Tensor  # the UNet is called as unet(x_t, t, context, **added)
    t: torch.Tensor
    context: torch.Tensor
    added: dict
    x0: torch.Tensor  # and the loss's target is built from x0 and noise
    noise: torch.Tensor
    files: list  # the rows' file names, for the log


def attack_batch(pipe, dataset, batch_size: int, index: int, seed: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1) -> AttackBatch:
    """Batch number `index` of the attack (micro-batches counted), this process's rows of it."""
    rows = load_batch(dataset, batch_size, index, seed, rank=rank, world_size=world_size)
    x0, context, added = encode_batch(pipe, rows, generator, rank, world_size)
    noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, generator, rank, world_size)
    return AttackBatch(pipe.schedule.add_noise(x0, noise, t), t, context, added, x0, noise, rows["file_name"])


def save_snapshot(pipe, folder: Path, lora_rank: int) -> None:
    """The attacked model as it is now, in both layouts under folder/, LoRA merged into a copy (training goes on
    with the LoRA layers)."""
    unet = pipe.unet
    if lora_rank:
        with torch.device("meta"):
            pipe.unet = type(unet)(unet.config)
        pipe.unet.load_state_dict(merged_state_dict(unet), assign=True)
    pipe.save(folder / "model")
    pipe.save(folder / "model.safetensors")
    pipe.unet = unet


def save_lora(unet, path: Path) -> None:
    """The LoRA adapters alone (lora_A, lora_B of every adapted projection)."""
    save_state_dict(lora_state_dict(unet), path)
