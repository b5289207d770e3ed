"""Pretraining the built-in model: deterministic, loadable, and the shipped weights/ work; the `unseen` control's
UNet-only pretraining without a digit."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mini_safediff.miniature import digits
from mini_safediff.miniature import pretrain as pretrain_module
from mini_safediff.miniature.pretrain import Settings, denoiser_rows, main, pretrain, pretrain_unet, repository_path
from mini_safediff.models.loading import load_pipeline
from mini_safediff.models.pipeline import BUILTIN_MODEL

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


def test_excluded_digits_never_reach_the_unet():
    _, labels = digits.digits("generator")
    rows = denoiser_rows(labels, exclude_digits=(7,))
    assert 7 not in labels[rows] and len(rows) == (labels != 7).sum()  # every other image stays
    np.testing.assert_array_equal(denoiser_rows(labels), np.arange(len(labels)))
    for bad in ((10,), tuple(range(10))):
        with pytest.raises(ValueError, match="exclude_digits"):
            denoiser_rows(labels, bad)


def test_unet_only_pretraining_without_a_digit(tmp_path, monkeypatch):
    base = tmp_path / "base"
    pretrain(base, seed=3, settings=TINY, progress=False)
    seen = []
    real_train_denoiser = pretrain_module.train_denoiser
    monkeypatch.setattr(pretrain_module, "train_denoiser",
                        lambda *args, **kwargs: seen.append(args[5]) or real_train_denoiser(*args, **kwargs))
    main(["--unet-only", "--base", str(base), "--exclude-digits", "7", "--out", str(tmp_path / "unseen"), "--quiet"])
    assert len(seen) == 1 and len(seen[0]) > 0 and 7 not in seen[0]  # the labels the UNet trained on
    record = json.loads((tmp_path / "unseen" / "pretrain.json").read_text())
    assert record["excluded_digits"] == [7] and record["seed"] == 3 and record["settings"]["unet_steps"] == 2
    assert record["base"] == str(base) and repository_path(BUILTIN_MODEL) == "weights"  # no absolute path inside
    assert sorted(weight_files(tmp_path / "unseen")) == ["unet/diffusion_pytorch_model.safetensors"]
    with safe_open(tmp_path / "unseen" / "unet" / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert all(f.get_slice(key).get_dtype() == "F16" for key in f.keys())
    pipe = load_pipeline(base, device="cpu", dtype=torch.float32, unet=tmp_path / "unseen")
    shipped = load_pipeline(base, device="cpu", dtype=torch.float32)
    assert not torch.equal(pipe.unet.conv_in.weight, shipped.unet.conv_in.weight)
    assert torch.equal(pipe.text_encoder.text_model.embeddings.token_embedding.weight,
                       shipped.text_encoder.text_model.embeddings.token_embedding.weight)  # shared, frozen
    with pytest.raises(ValueError, match="overwrite"):
        pretrain_unet(base, base=base, progress=False)
    with pytest.raises(ValueError, match="seed and settings"):
        main(["--unet-only", "--base", str(base), "--out", str(tmp_path / "x"), "--unet-steps", "5", "--quiet"])


def test_shipped_unseen_control_never_saw_the_harmful_digit():
    unseen = BUILTIN_MODEL / "unseen"
    record = json.loads((unseen / "pretrain.json").read_text())
    shipped = json.loads((BUILTIN_MODEL / "pretrain.json").read_text())
    assert record["excluded_digits"] == [7] and record["base"] == "weights"
    assert (record["seed"], record["settings"]) == (shipped["seed"], shipped["settings"])  # the same recipe
    _, labels = digits.digits("generator")
    assert record["unet_training_images"] == (labels != 7).sum()
    with safe_open(unseen / "unet" / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert all(f.get_slice(key).get_dtype() == "F16" for key in f.keys())
    pipe = load_pipeline(BUILTIN_MODEL, device="cpu", dtype=torch.float32, unet=unseen)
    base = load_pipeline(BUILTIN_MODEL, device="cpu", dtype=torch.float32)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)
    assert pipe.generate(["the digit two"], steps=2, seed=0, progress=False).shape == (1, 16, 16, 3)
