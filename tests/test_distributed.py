"""torchrun with 2 CPU processes (gloo) on a tiny model: each rank gets its rows of the one-process batch with the
same random numbers, and train.py / attack.py train the same weights and centres as one process, resume included.

Tolerance. The two runs add the same numbers in a different order (per-rank means averaged by the all-reduce,
convolutions over 2 rows instead of 4), so gradients agree to float32 rounding (~1e-7 relative); logged losses,
gradient norms and the class centres are compared at 1e-5 relative. Adam's update g / (sqrt(v) + eps) turns that
rounding into up to a whole step (lr) for the few parameters whose gradient is close to zero, so the weights are
compared as: no element off by more than one lr step, and the mean difference under 1e-4 of the mean distance
the weights moved. A wrong row, noise slice, gradient average or centre update moves most elements by O(lr).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import write_data

import mini_safediff as msd
from mini_safediff.training.checkpoints import load_checkpoint
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.steps import draw_noise_and_timesteps, encode_batch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attack  # noqa: E402
import train  # noqa: E402

LR = 1e-3


# One torchrun launch for all runs (each launch costs an interpreter start per process): a 2-step train.py run,
# its resumption to 4 steps (fresh objects, state from checkpoint.pt only) and an attack.py run.
WORKER = """
import json, sys
import torch
import attack, train
runs = json.loads(sys.argv[1])
train.train(train.parse_args(runs["train"]))
train.train(train.parse_args(runs["resume"]))
attack.finetune(attack.parse_args(runs["attack"]))
torch.distributed.destroy_process_group()
"""


def strings(*args) -> list:
    return list(map(str, args))


def train_args(model, data, *extra) -> list:
    return strings("--model", model, "--data", data, "--device", "cpu", "--quiet", "--lr", LR, "--lambda", 1e-2,
                   "--batch-size", 4, "--grad-accum", 2, "--random-flip", "--checkpoint-every", 2, *extra)


def attack_args(model, data, *extra) -> list:
    return strings("--model", f"ours={model}", "--harmful-only-data", data, "--device", "cpu", "--quiet", "--lr", LR,
                   "--batch-size", 4, "--grad-accum", 2, "--steps", 3, "--adam-bf16", *extra)


@pytest.fixture(scope="module")
def two_processes(model, tmp_path_factory) -> Path:
    """The runs of WORKER under `torchrun --standalone --nproc_per_node 2` (gloo, a free port, one thread each)."""
    out = tmp_path_factory.mktemp("ddp")
    mixed, harmful = write_data(out / "mixed", [1, 2, 1, 2, 2, 1]), write_data(out / "harmful", [2, 2, 2, 2, 2])
    runs = {"train": train_args(model, mixed, "--steps", 2, "--out", out / "train"),
            "resume": train_args(model, mixed, "--steps", 4, "--out", out / "train", "--resume"),
            "attack": attack_args(model, harmful, "--out", out / "attack")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--no-python", sys.executable, "-c", WORKER, json.dumps(runs)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes" in result.stdout  # really one DDP run over 2 ranks, not 2 separate runs
    return out


def read_log(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, start: dict, numbers: list):
    """Checkpoints and logs of a 1-process and a 2-process run (tolerances: module docstring)."""
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert a["step"] == b["step"] and torch.equal(a["generator"], b["generator"])  # the same random stream used
    difference = torch.cat([(a["unet"][k] - b["unet"][k]).abs().flatten() for k in start])
    moved = torch.cat([(a["unet"][k] - start[k]).abs().flatten() for k in start])
    assert difference.max() <= LR and difference.mean() <= 1e-4 * moved.mean(), (difference.max(), moved.mean())
    log_one, log_two = read_log(one), read_log(two)
    assert [row["step"] for row in log_one] == [row["step"] for row in log_two] == list(range(1, a["step"] + 1))
    for row_one, row_two in zip(log_one, log_two):
        assert row_one.get("files") == row_two.get("files")
        for key in numbers:
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5), (row_one["step"], key)
    return a, b


def test_each_rank_gets_its_rows_of_the_one_process_batch(model, tmp_path):
    pipe = msd.load_pipeline(model, device="cpu")
    dataset = SafetyDataset(write_data(tmp_path / "data", [1, 2, 1, 2, 2]), 16, random_flip=True)
    whole = load_batch(dataset, 4, step=3, seed=0)
    generator = torch.Generator().manual_seed(0)
    x0, context, _ = encode_batch(pipe, whole, generator)
    noise, t = draw_noise_and_timesteps(x0, 1000, generator)
    for rank in (0, 1):
        mine = load_batch(dataset, 4, step=3, seed=0, rank=rank, world_size=2)
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(mine["pixel_values"], whole["pixel_values"][rows])  # flips included
        assert torch.equal(mine["harmful"], whole["harmful"][rows]) and mine["text"] == whole["text"][rows]
        assert mine["file_name"] == whole["file_name"]  # the whole batch, for the log
        generator_of_rank = torch.Generator().manual_seed(0)
        x0_mine, context_mine, _ = encode_batch(pipe, mine, generator_of_rank, rank, 2)
        noise_mine, t_mine = draw_noise_and_timesteps(x0_mine, 1000, generator_of_rank, rank, 2)
        torch.testing.assert_close(x0_mine, x0[rows], rtol=1e-6, atol=1e-6)  # the VAE on 2 rows instead of 4
        torch.testing.assert_close(context_mine, context[rows], rtol=1e-6, atol=1e-6)
        assert torch.equal(noise_mine, noise[rows]) and torch.equal(t_mine, t[rows])
        assert torch.equal(generator_of_rank.get_state(), generator.get_state())


def test_a_batch_that_does_not_split_over_the_processes_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    data = write_data(tmp_path / "data", [1, 2])
    with pytest.raises(ValueError, match=r"--batch-size 3 \(the global batch\) does not split evenly over 2"):
        train.train(train.parse_args(["--model", str(model), "--data", str(data), "--batch-size", "3",
                                      "--device", "cpu", "--out", str(tmp_path / "out")]))


def test_train_with_two_processes_matches_one_and_resumes(model, two_processes, tmp_path):
    train.train(train.parse_args(train_args(model, two_processes / "mixed", "--steps", 4, "--out", tmp_path)))
    start = msd.load_pipeline(model, device="cpu").unet.state_dict()
    one, two = assert_same_training(tmp_path, two_processes / "train", start, [
        "loss", "mse", "contrastive", "d_own", "d_other", "centre_distance", "grad_norm"])
    assert torch.equal(one["method"]["count"], two["method"]["count"])  # every row of every batch counted once
    centres_one, centres_two = one["method"]["mean"], two["method"]["mean"]
    assert (centres_one - centres_two).abs().max() <= 1e-5 * centres_one.abs().max()
    saved = msd.load_pipeline(two_processes / "train" / "model", device="cpu").unet.state_dict()
    assert all(torch.equal(saved[k], two["unet"][k]) for k in saved)  # rank 0 wrote the final model


def test_attack_with_two_processes_matches_one(model, two_processes, tmp_path):
    attack.finetune(attack.parse_args(attack_args(model, two_processes / "harmful", "--out", tmp_path)))
    start = msd.load_pipeline(model, device="cpu").unet.state_dict()
    _, two = assert_same_training(tmp_path / "ours", two_processes / "attack" / "ours", start, ["loss", "grad_norm"])
    assert {state[k].dtype for state in two["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")} == \
        {torch.bfloat16}  # --adam-bf16 reached attack.py's optimizer
    assert (two_processes / "attack" / "ours" / "step-3" / "model.safetensors").is_file()
