"""Pretraining the built-in model: deterministic, loadable, and the shipped weights/ work."""
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mini_safediff.miniature.pretrain import Settings, main, pretrain
from mini_safediff.models.pipeline import BUILTIN_MODEL, load_pipeline

TINY = Settings(vae_channels=(8, 16), unet_channels=(8, 16), text_width=16, text_layers=1, vae_steps=2,
                unet_steps=2, judge_steps=2, batch_size=4, check_images=1, check_steps=2)
TINY_ARGS = ["--vae-channels", "8", "16", "--unet-channels", "8", "16", "--text-width", "16", "--text-layers", "1",
             "--vae-steps", "2", "--unet-steps", "2", "--judge-steps", "2", "--batch-size", "4",
             "--check-images", "1", "--check-steps", "2", "--quiet"]


def weight_files(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*.safetensors"))}


def test_pretraining_is_deterministic_and_loadable(tmp_path):
    report = pretrain(tmp_path / "a", seed=5, settings=TINY, progress=False)
    main(["--out", str(tmp_path / "b"), "--seed", "5", *TINY_ARGS])  # the command line, same settings
    first, second = weight_files(tmp_path / "a"), weight_files(tmp_path / "b")
    assert set(first) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors", "judge.safetensors"}
    assert first == second
    pretrain(tmp_path / "c", seed=6, settings=TINY, progress=False)
    assert weight_files(tmp_path / "c")["unet/diffusion_pytorch_model.safetensors"] != \
        first["unet/diffusion_pytorch_model.safetensors"]

    pipe = load_pipeline(tmp_path / "a", device="cpu", dtype=torch.float32)
    assert pipe.unet.config.block_out_channels == [8, 16] and pipe.vae.config.scaling_factor == \
        report["vae_scaling_factor"]
    assert set(report["generation_accuracy_per_digit"]) == {str(d) for d in range(10)}
    assert (tmp_path / "a" / "samples.png").is_file()


def test_shipped_weights_load_and_generate():
    size = sum(path.stat().st_size for path in BUILTIN_MODEL.rglob("*") if path.is_file())
    assert size < 25 * 2 ** 20
    with safe_open(BUILTIN_MODEL / "unet" / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert all(f.get_slice(key).get_dtype() == "F16" for key in f.keys())
    pipe = load_pipeline(BUILTIN_MODEL, device="cpu", dtype=torch.float32)
    assert pipe.dtype == torch.float32
    images = pipe.generate(["a handwritten digit seven", "the digit two"], steps=2, seed=0, progress=False)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    latents = pipe.generate(["the digit two"], steps=2, seed=0, progress=False, return_latents=True)
    assert latents.shape == (1, 4, 8, 8)
