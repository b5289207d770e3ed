"""The method interface (methods/method.py): a method added in a test is one class and one registry line, trained
through train.py's entry point untouched; its options are its own; its state travels with the checkpoints."""
import json
import sys
from pathlib import Path

import pytest
import torch
from builders import write_data

import mini_safediff as msd
from mini_safediff.methods import registry
from mini_safediff.methods.method import Method, Option
from mini_safediff.training.checkpoints import load_checkpoint
from mini_safediff.training.steps import mse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


class ScaledDiffusion(Method):
    """The plain diffusion loss on every row, times --loss-scale; counts the batches it drew (its state)."""
    help = "scaled: the diffusion loss times --loss-scale"
    options = (Option("--loss-scale", {"type": float, "default": 1.0, "help": "the loss's factor"}),)

    def __init__(self, args, pipe, dataset, generator, **setup):
        super().__init__(args, pipe, dataset, generator, **setup)
        self.batches = 0

    def batch(self, index):
        self.batches += 1
        return super().batch(index)

    def loss(self, pred, batch):
        loss = self.args.loss_scale * mse(pred, self.pipe.schedule.target(batch.x0, batch.noise, batch.t))
        return loss, {"loss": loss.item(), "batches": float(self.batches)}

    def state_dict(self):
        return {"batches": torch.tensor(self.batches)}

    def load_state_dict(self, state):
        self.batches = int(state["batches"])


@pytest.fixture
def scaled(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "scaled", ScaledDiffusion)


def run(model, data, out, *extra):
    return train.main(["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet",
                       "--lr", "1e-3", "--weight-decay", "0", "--batch-size", "2", *extra])


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_method_registered_in_a_test_trains_through_train_py(model, scaled, tmp_path):
    data = write_data(tmp_path / "data", [1, 2, 1, 2])
    folder = run(model, data, tmp_path / "one", "--method", "scaled", "--steps", "2")
    run(model, data, tmp_path / "two", "--method", "scaled", "--steps", "1", "--loss-scale", "2")
    start, trained = (msd.load_pipeline(path, device="cpu").unet.state_dict() for path in (model, folder))
    assert any(not torch.equal(start[key], trained[key]) for key in start)  # its loss trained the UNet
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert two[0]["loss"] == 2 * one[0]["loss"]  # the same first batch (x2 is exact): its option reached its loss
    assert [row["batches"] for row in one] == [1.0, 2.0]
    assert load_checkpoint(tmp_path / "one" / "checkpoint.pt")["method"] == {"batches": torch.tensor(2)}


def test_its_state_is_restored_on_resume(model, scaled, tmp_path):
    data = write_data(tmp_path / "data", [1, 2, 1, 2])
    common = ("--method", "scaled", "--checkpoint-every", "1")
    straight = run(model, data, tmp_path / "straight", "--steps", "3", *common)
    run(model, data, tmp_path / "resumed", "--steps", "1", *common)
    resumed = run(model, data, tmp_path / "resumed", "--steps", "3", "--resume", *common)
    assert [row["batches"] for row in log(tmp_path / "resumed")] == [1.0, 2.0, 3.0]
    a, b = (msd.load_pipeline(path, device="cpu").unet.state_dict() for path in (straight, resumed))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("argv, message", [
    (["--method", "lt", "--loss-scale", "2"], "--loss-scale is an option of --method scaled, not of lt"),
    (["--method", "lt", "--immunize-with", "ng"], "--immunize-with is an option of --method immunize, not of lt"),
    (["--method", "ng", "--concept", "a cat"], "--concept is an option of --method esd-u / esd-x, not of ng"),
    (["--method", "esd-u", "--concept", " "], "--method esd-u: --concept \\[' '\\] has an empty concept"),
    (["--method", "esd-x", "--lambda", "1"], "--lambda is an option of --method lt / ng / immunize, not of esd-x"),
    (["--method", "naive", "--margin", "1"], "--margin is an option of --method lt / ng / immunize, not of naive"),
])
def test_an_option_of_another_method_is_refused_by_name(scaled, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lt", "ng", "naive", "immunize", "scaled"])
def test_data_without_harmful_rows_is_refused(model, scaled, method, tmp_path):
    data = write_data(tmp_path / "data", [1, 1])
    with pytest.raises(ValueError, match=f"--method {method} trains the model away from harmful rows: .* has 2 rows, none of them harmful"):
        run(model, data, tmp_path / "out", "--method", method, "--steps", "1")


def test_each_method_gets_its_preset_and_the_options_merge_into_one_parser():
    assert {name: train.parse_args(["--method", name, *(["--concept", "x"] if name.startswith("esd") else [])]
                                   ).preset for name in registry.METHODS} == {
        "lt": "paper", "ng": "paper", "naive": "naive", "esd-u": "esd", "esd-x": "esd", "immunize": "immunize"}
    naive = train.parse_args(["--method", "naive"])
    assert (naive.harmful_weight, naive.steps, naive.lr, naive.batch_size) == (-0.5, 200, 1e-5, 1)
    merged = registry.method_options()
    assert merged["--lambda"][1] == ["lt", "ng", "immunize"] and merged["--harmful-weight"][1] == [
        "lt", "ng", "naive", "immunize"]


def test_naive_is_lts_loss_with_lambda_zero(model, tmp_path):
    """The same loss as LT's with --lambda 0 on one batch; only the random numbers of a run differ (LT draws
    its class centres from the run's generator first)."""
    from types import SimpleNamespace

    from mini_safediff.methods.contrastive import LatentTransformation
    from mini_safediff.methods.naive import NaiveAscent
    from mini_safediff.training.data import SafetyDataset

    pipe = msd.load_pipeline(model, device="cpu")
    args = SimpleNamespace(method="naive", harmful_weight=-0.5, lam=0.0, lambda_contrast=1.0, margin=0.0,
                           contrast="official", no_contrast_grad=False, batch_size=4, seed=0, balanced=True)
    dataset = SafetyDataset(write_data(tmp_path / "data", [1, 2, 1, 2]), 16)
    naive = NaiveAscent(args, pipe, dataset, torch.Generator().manual_seed(0))
    lt = LatentTransformation(args, pipe, dataset, torch.Generator().manual_seed(0))
    batch = naive.batch(0)
    pred = pipe.unet(batch.x_t, batch.t, batch.context)
    assert torch.equal(naive.loss(pred, batch)[0], lt.loss(pred, batch)[0])
