"""attack.py on a tiny random model: it learns, LoRA merges exactly, snapshots equal shorter runs, and every
attacked model sees the same data and noise."""
import json
import sys
from pathlib import Path

import pytest
import torch
from builders import write_data
from safetensors.torch import load_file

import mini_safediff as msd
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.steps import diffusion_loss, draw_noise_and_timesteps, encode_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attack  # noqa: E402


def run(models, data, out, *extra):
    model_options = [option for m in models for option in ("--model", str(m))]
    args = [*model_options, "--harmful-only-data", str(data), "--out", str(out), "--device", "cpu", "--quiet", *extra]
    return attack.finetune(attack.parse_args(args))


@torch.no_grad()
def loss_on(folder, data) -> float:
    """The diffusion loss on the data's images, averaged over 32 fixed (noise, timestep) draws."""
    pipe = msd.load_pipeline(folder, device="cpu")
    batch = load_batch(SafetyDataset(data, 16, rows="all_harmful"), 32, 0, seed=0)
    generator = torch.Generator().manual_seed(123)
    x0, context, added = encode_batch(pipe, batch, generator)
    noise, t = draw_noise_and_timesteps(x0, 1000, generator)
    return diffusion_loss(pipe.unet(pipe.schedule.add_noise(x0, noise, t), t, context, **added), x0, noise, t,
                          pipe.schedule).item()


@pytest.mark.parametrize("mode", [["--lr", "1e-3"], ["--lr", "1e-2", "--lora-rank", "4"]], ids=["full", "lora"])
def test_the_attack_learns_its_image(model, tmp_path, mode):
    data = write_data(tmp_path / "data", [2])
    attacked = run([model], data, tmp_path / "out", "--steps", "30", *mode)[0]
    before, after = loss_on(model, data), loss_on(attacked, data)
    assert after < 0.8 * before, (before, after)


def test_lora_changes_only_its_projections_and_merges_exactly(model, tmp_path):
    data = write_data(tmp_path / "data", [2, 2])
    attacked = run([model], data, tmp_path / "out", "--steps", "3", "--lr", "1e-2", "--lora-rank", "2",
                   "--lora-alpha", "4")[0]
    base, merged = msd.load_pipeline(model).unet.state_dict(), msd.load_pipeline(attacked).unet.state_dict()
    lora = load_file(tmp_path / "out" / "ours" / "lora.safetensors")
    targets = {key[: -len(".lora_A")] + ".weight" for key in lora if key.endswith(".lora_A")}
    assert targets and all(".attn1." in k or ".attn2." in k for k in targets)
    assert {k for k in base if not torch.equal(base[k], merged[k])} == targets
    for key in targets:
        stem = key[: -len(".weight")]
        assert torch.equal(merged[key], base[key] + (4 / 2) * lora[f"{stem}.lora_B"] @ lora[f"{stem}.lora_A"])


def test_snapshots_equal_separate_shorter_runs(model, tmp_path, capsys):
    data = write_data(tmp_path / "data", [2, 2, 2])
    common = ["--lr", "1e-3", "--batch-size", "2"]
    run([model], data, tmp_path / "long", "--steps", "4", "--save-at", "0,2,4", *common)
    run([model], data, tmp_path / "short", "--steps", "2", *common)
    snapshots = sorted(p.name for p in (tmp_path / "long" / "ours").glob("step-*"))
    assert snapshots == ["step-0", "step-2", "step-4"]
    for a, b in [("long/ours/step-2", "short/ours/step-2"), ("long/ours/step-0", None)]:
        got = msd.load_pipeline(tmp_path / a / "model.safetensors").unet.state_dict()
        expected = msd.load_pipeline(tmp_path / b / "model" if b else model).unet.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    record = json.loads((tmp_path / "long" / "ours" / "attack.json").read_text())
    assert record["hyperparameters"]["lr"] == 1e-3 and record["files"] == ["0.png", "1.png", "2.png"]
    with pytest.raises(ValueError, match="holds an earlier run"):  # a new run never mixes with an old one
        run([model], data, tmp_path / "long", "--steps", "2", *common)
    capsys.readouterr()
    run([model], data, tmp_path / "long", "--steps", "6", "--save-at", "6", "--resume", *common)
    assert "also holds step-0, step-2, step-4 from an earlier run" in capsys.readouterr().err


def test_every_model_sees_the_same_data_and_noise(model, tmp_path):
    data = write_data(tmp_path / "data", [2, 2, 2, 2])
    other = tmp_path / "other" / "model"
    pipe = msd.load_pipeline(model, device="cpu")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(0.9)
    pipe.save(other)
    common = ["--steps", "3", "--lr", "1e-3"]
    run([model, other], data, tmp_path / "both", *common)
    run([other], data, tmp_path / "alone", *common)
    logs = [[row["files"] for row in map(json.loads, (tmp_path / "both" / name / "log.jsonl").read_text().splitlines())]
            for name in ("ours", "other")]
    assert logs[0] == logs[1] and len(logs[0]) == 3
    together = msd.load_pipeline(tmp_path / "both" / "other" / "step-3" / "model").unet.state_dict()
    alone = msd.load_pipeline(tmp_path / "alone" / "other" / "step-3" / "model").unet.state_dict()
    assert all(torch.equal(together[k], alone[k]) for k in alone)


@pytest.mark.parametrize("mode", [[], ["--lora-rank", "2"]], ids=["full", "lora"])
def test_sdxl_attack_runs_and_resumes_exactly(sdxl_model, tmp_path, mode):
    """Two steps on a tiny SDXL model, straight and as 1 + 1 with a resume: the same weights, which moved."""
    data = write_data(tmp_path / "data", [2, 2, 2])
    common = ["--lr", "1e-3", "--batch-size", "2", "--checkpoint-every", "1", *mode]
    straight = run([sdxl_model], data, tmp_path / "straight", "--steps", "2", *common)[0]
    run([sdxl_model], data, tmp_path / "resumed", "--steps", "1", *common)
    resumed = run([sdxl_model], data, tmp_path / "resumed", "--steps", "2", "--resume", *common)[0]
    straight, resumed = (msd.load_pipeline(folder, device="cpu") for folder in (straight, resumed))
    assert resumed.is_sdxl
    before, a, b = (pipe.unet.state_dict() for pipe in (msd.load_pipeline(sdxl_model, device="cpu"), straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(before[k], a[k]) for k in a)
