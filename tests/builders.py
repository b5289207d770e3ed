"""Small models and data made with this package alone (no oracle), for the tests that need something to load,
train or attack."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mini_safediff as msd
from mini_safediff.models.config import config_from_dict

TINY_UNET = {
    "sd1": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8),
    "sd2": dict(block_out_channels=[32, 64], layers_per_block=2, cross_attention_dim=32, attention_head_dim=[2, 4],
                norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=8),
}
TINY_VAE = dict(block_out_channels=[32, 64], norm_num_groups=8, latent_channels=4, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77)


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> msd.Pipeline:
    """A random tiny SD1-style (quick_gelu, pads with <|endoftext|>) or SD2-style (gelu, linear projections,
    per-block heads, upcast attention, pads with "!") pipeline; every weight moved off its initial value."""
    torch.manual_seed(seed)
    sd1 = kind == "sd1"
    pipe = msd.Pipeline(
        unet=msd.UNet2DConditionModel(config_from_dict(msd.UNetConfig, TINY_UNET[kind])),
        vae=msd.AutoencoderKL(config_from_dict(msd.VAEConfig, TINY_VAE)),
        text_encoder=msd.CLIPTextModel(config_from_dict(
            msd.CLIPTextConfig, {**TINY_TEXT, "hidden_act": "quick_gelu" if sd1 else "gelu"})),
        tokenizer=msd.CLIPTokenizer.default(pad_token="<|endoftext|>" if sd1 else "!"),
        schedule=msd.NoiseSchedule(msd.SchedulerConfig()))
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):  # no zero-initialised layer may hide a wrong connection
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.eval().requires_grad_(False)
    return pipe


def write_data(folder: Path, classes: list) -> Path:
    """A dataset folder in the official format: random 16x16 PNGs, one metadata.jsonl row each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, label in enumerate(classes):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"digit {i}", "class": label}) + "\n")
    return folder
