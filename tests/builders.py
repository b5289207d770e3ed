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
    # no attention at the first level, two transformer blocks at the second, the pooled text (24) and six size
    # numbers added to the timestep; the context is both encoders' hidden states side by side (32 + 32)
    "sdxl": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64, attention_head_dim=[2, 4],
                 transformer_layers_per_block=[1, 2], norm_num_groups=8, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], sample_size=8),
}
TINY_VAE = dict(block_out_channels=[32, 64], norm_num_groups=8, latent_channels=4, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77)
TINY_TEXT_2 = dict(TINY_TEXT, num_hidden_layers=3, hidden_act="gelu", projection_dim=24)  # SDXL's OpenCLIP bigG
SDXL_SCALING_FACTOR = 0.13025


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> msd.Pipeline:
    """A random tiny SD1-style (quick_gelu, pads with <|endoftext|>), SD2-style (gelu, linear projections,
    per-block heads, upcast attention, pads with "!") or SDXL-style (CLIP-L-like first encoder, OpenCLIP-like
    second with a projection, padding with "!") pipeline; every weight moved off its initial value."""
    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    sdxl = {}
    if kind == "sdxl":
        sdxl = {"text_encoder_2": msd.CLIPTextModelWithProjection(config_from_dict(msd.CLIPTextConfig, TINY_TEXT_2)),
                "tokenizer_2": msd.CLIPTokenizer.default(pad_token="!")}
    pipe = msd.Pipeline(
        unet=msd.UNet2DConditionModel(config_from_dict(msd.UNetConfig, TINY_UNET[kind])),
        vae=msd.AutoencoderKL(config_from_dict(msd.VAEConfig, {**TINY_VAE, **(
            {"scaling_factor": SDXL_SCALING_FACTOR} if sdxl else {})})),
        text_encoder=msd.CLIPTextModel(config_from_dict(
            msd.CLIPTextConfig, {**TINY_TEXT, "hidden_act": "gelu" if sd2 else "quick_gelu"})),
        tokenizer=msd.CLIPTokenizer.default(pad_token="!" if sd2 else "<|endoftext|>"),
        schedule=msd.NoiseSchedule(msd.SchedulerConfig()), **sdxl)
    for model in [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else []):
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
