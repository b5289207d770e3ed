"""Faults during training and attack: Ctrl-C at a random moment, then --resume, equals the uninterrupted run bit
for bit on the CPU; a diverging update is never saved as the last good checkpoint."""
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from builders import write_data  # noqa: E402

import attack  # noqa: E402
import train  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel  # noqa: E402
from mini_safediff.models.weights import read_state_dict  # noqa: E402
from mini_safediff.training.checkpoints import load_checkpoint  # noqa: E402

STEPS, GRAD_ACCUM = 5, 2


def train_run(model, data, out, *extra):
    train.train(train.parse_args(["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                                  "--quiet", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", str(GRAD_ACCUM),
                                  "--checkpoint-every", "3", "--ema", "0.9", "--random-flip", *extra]))
    return out / "model" / "unet" / "diffusion_pytorch_model.safetensors"


def attack_run(model, data, out, *extra):
    attack.finetune(attack.parse_args(["--model", f"m={model}", "--harmful-only-data", str(data), "--out", str(out),
                                     "--device", "cpu", "--quiet", "--lr", "1e-3", "--batch-size", "2",
                                     "--grad-accum", str(GRAD_ACCUM), "--checkpoint-every", "3", "--save-at", "2",
                                     *extra]))
    return out / "m" / f"step-{STEPS}" / "model" / "unet" / "diffusion_pytorch_model.safetensors"


def interrupt_at_forward(monkeypatch, call: int):
    """SIGINT to this process at the start of the UNet's `call`-th forward pass (as a Ctrl-C would arrive)."""
    forward, calls = UNet2DConditionModel.forward, [0]

    def counting(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)


@pytest.mark.parametrize("script", ["train", "attack"])
def test_ctrl_c_at_random_moments_then_resume_equals_the_uninterrupted_run(script, model, tmp_path, monkeypatch):
    run = train_run if script == "train" else attack_run
    data = write_data(tmp_path / "data", [1, 2, 1, 2, 2] if script == "train" else [2, 2, 2])
    straight = read_state_dict(run(model, data, tmp_path / "straight", "--steps", str(STEPS)))
    for trial in range(3):
        # any micro-batch of any step but the last (stopped in the last step, a run simply finishes)
        call = random.Random(trial).randint(1, (STEPS - 1) * GRAD_ACCUM)
        out = tmp_path / f"trial-{trial}"
        with monkeypatch.context() as patch:
            interrupt_at_forward(patch, call)
            with pytest.raises(SystemExit, match="continue with --resume"):
                run(model, data, out, "--steps", str(STEPS))
        resumed = read_state_dict(run(model, data, out, "--steps", str(STEPS), "--resume"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"trial {trial}: SIGINT at forward {call}"


def test_a_diverging_update_is_never_saved_as_good(model, tmp_path):
    data = write_data(tmp_path / "data", [1, 2, 1])
    out = tmp_path / "out"
    train_run(model, data, out, "--steps", "3", "--checkpoint-every", "1")
    with pytest.raises(SystemExit, match=r"step 4: the (loss|gradient norm) is (nan|inf).*Stopped before the update; "
                                         r"the last good checkpoint is .*checkpoint.pt \(step 3\)"):
        train_run(model, data, out, "--steps", "6", "--checkpoint-every", "1", "--resume", "--lr", "1e30",
                  "--allow-changed-settings")
    kept = load_checkpoint(out / "checkpoint.pt")
    assert kept["step"] == 3 and all(torch.isfinite(w).all() for w in kept["unet"].values())
    weights = read_state_dict(train_run(model, data, out, "--steps", "6", "--checkpoint-every", "1", "--resume"))
    assert all(torch.isfinite(w).all() for w in weights.values())
