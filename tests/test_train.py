"""train.py on a tiny random model: the contrastive term trains the UNet, resume is exact, NaN stops."""
import json
import sys
from pathlib import Path

import pytest
import torch

import mini_safediff as msd
from mini_safediff.losses import ContrastiveCentres, SafetyLossConfig, safety_loss
from mini_safediff.training import draw_noise_and_timesteps, encode_batch, load_checkpoint
from mini_safediff.data import SafetyDataset, load_batch
from tiny_models import write_data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


def run(model, data, out, *extra):
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet",
            "--lr", "1e-3", "--weight-decay", "0", *extra]
    return train.train(train.parse_args(args))


def unet_weights(folder):
    return msd.load_pipeline(folder, device="cpu").unet.state_dict()


@pytest.mark.parametrize("contrast_grad", [True, False])
def test_contrastive_term_alone_carries_gradient(model, tmp_path, contrast_grad):
    pipe = msd.load_pipeline(model, device="cpu")
    dataset = SafetyDataset(write_data(tmp_path / "data", [2, 2]), 16)
    batch = load_batch(dataset, 2, 0, seed=0)
    generator = torch.Generator().manual_seed(0)
    x0, context = encode_batch(pipe, batch, generator)
    noise, t = draw_noise_and_timesteps(x0, 1000, generator)
    x_t = pipe.schedule.add_noise(x0, noise, t)
    unet = pipe.unet.train().requires_grad_(True)
    config = SafetyLossConfig(method="lt", lam=1.0, harmful_weight=0.0, contrast_grad=contrast_grad)
    loss, _ = safety_loss(unet(x_t, t, context), x_t, t, x0, noise, batch["harmful"], pipe.schedule,
                          ContrastiveCentres(x0.shape[1:], generator), config)
    loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in unet.parameters()]).norm().item()
    assert loss.item() != 0
    assert (grad_norm > 0) if contrast_grad else (grad_norm == 0)


def test_two_steps_on_harmful_only_data_change_the_unet_only_with_contrast_grad(model, tmp_path):
    data = write_data(tmp_path / "data", [2, 2, 2])
    before = unet_weights(model)
    ours = unet_weights(run(model, data, tmp_path / "ours", "--steps", "2", "--lambda", "1e-2"))
    official = unet_weights(run(model, data, tmp_path / "official", "--steps", "2", "--lambda", "1e-2",
                                "--no-contrast-grad"))
    assert any(not torch.equal(before[k], ours[k]) for k in before)
    assert all(torch.equal(before[k], official[k]) for k in before)


@pytest.mark.parametrize("method", ["lt", "ng"])
def test_resume_is_exact(model, tmp_path, method):
    data = write_data(tmp_path / "data", [1, 2, 1, 2, 1])
    common = ["--method", method, "--batch-size", "2", "--lambda", "1e-3", "--checkpoint-every", "2"]
    straight = unet_weights(run(model, data, tmp_path / "straight", "--steps", "4", *common))
    run(model, data, tmp_path / "resumed", "--steps", "2", *common)
    resumed = unet_weights(run(model, data, tmp_path / "resumed", "--steps", "4", "--resume", *common))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert {"lr", "mse", "contrastive", "d_own", "d_other", "centre_distance", "grad_norm", "seconds"} <= log[0].keys()


def test_outputs_load_in_diffusers_and_single_file(model, tmp_path):
    from diffusers import StableDiffusionPipeline

    data = write_data(tmp_path / "data", [1, 2])
    folder = run(model, data, tmp_path / "out", "--steps", "1")
    trained = unet_weights(folder)
    single = msd.load_pipeline(tmp_path / "out" / "model.safetensors", device="cpu").unet.state_dict()
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).unet.state_dict()
    assert all(torch.equal(trained[k], single[k]) and torch.equal(trained[k], theirs[k]) for k in trained)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model, tmp_path):
    data = write_data(tmp_path / "data", [1, 2])
    run(model, data, tmp_path / "out", "--steps", "2")
    good = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"step 2: the loss is nan .* last good checkpoint"):
        run(model, data, tmp_path / "out", "--steps", "4", "--resume", "--lambda", "nan")
    kept = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert kept["step"] == 2
    assert all(torch.equal(good["unet"][k], kept["unet"][k]) for k in good["unet"])
