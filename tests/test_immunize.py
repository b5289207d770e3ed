"""Immunization by simulated attacks (methods/immunize.py) on a tiny random model: the inner loop leaves the real
weights alone, K = 0 is the naive ascent, first-order and exact gradients agree to O(inner lr), train.py runs it
and resumes exactly, torchrun is refused by name."""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from builders import write_data

import mini_safediff as msd
from mini_safediff import cli
from mini_safediff.methods.contrastive import ContrastiveCentres, SafetyLossConfig, safety_loss
from mini_safediff.methods.immunize import ImmunizeConfig, SimulatedAttack, draw_attack, immunize_loss, inner_batches
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.steps import draw_noise_and_timesteps, encode_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


def setup(model, tmp_path, classes=(1, 2, 2, 1)):
    """The pipeline (UNet trainable), the dataset, the generator and an outer batch's tensors."""
    pipe = msd.load_pipeline(model, device="cpu")
    dataset = SafetyDataset(write_data(tmp_path / "data", list(classes)), 16)
    batch = load_batch(dataset, len(classes), 0, seed=0)
    generator = torch.Generator().manual_seed(0)
    x0, context, added = encode_batch(pipe, batch, generator)
    noise, t = draw_noise_and_timesteps(x0, 1000, generator)
    x_t = pipe.schedule.add_noise(x0, noise, t)
    pipe.unet.train().requires_grad_(True)
    return pipe, dataset, generator, (x_t, t, context, added, x0, noise, batch["harmful"])


def loss_of(pipe, tensors, attack, inner, cfg):
    x_t, t, context, added, x0, noise, harmful = tensors
    pred = pipe.unet(x_t, t, context, **added)
    return immunize_loss(pipe.unet, pred, x_t, t, context, added, x0, noise, harmful, pipe.schedule, attack, inner,
                         cfg)


@pytest.mark.parametrize("inner_grad", ["first-order", "exact"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_inner_loop_moves_only_the_simulated_copy(model, tmp_path, inner_grad, optimizer):
    pipe, dataset, generator, tensors = setup(model, tmp_path)
    attack = SimulatedAttack(steps=2, lr=1e-2 if optimizer == "sgd" else 1e-3, batch_size=2)
    inner = inner_batches(pipe, dataset, attack, generator)
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    loss, stats = loss_of(pipe, tensors, attack, inner, ImmunizeConfig(inner_optimizer=optimizer,
                                                                       inner_grad=inner_grad, cap=math.inf))
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # the real weights did not move
    assert all(p.grad is None for p in pipe.unet.parameters())  # nor did their gradients fill
    assert stats["inner_steps"] == 2 and stats["attacked_mse"] != stats["mse_harmful"]  # the copy did move
    assert stats["inner_loss_first"] != stats["inner_loss_last"]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pipe.unet.parameters())
    torch.optim.SGD(pipe.unet.parameters(), lr=1e-3).step()  # only the outer step moves them
    assert any(not torch.equal(before[key], value) for key, value in pipe.unet.state_dict().items())


@pytest.mark.parametrize("cap", [math.inf, 1e-6])
def test_with_no_attack_steps_the_loss_is_the_naive_ascent(model, tmp_path, cap):
    """K = 0: w_h mse - a min(mse, cap) on harmful rows: the naive loss (safety_loss, lambda 0) with harmful weight
    w_h - a below the cap, or w_h above it (minus a constant)."""
    pipe, _, generator, tensors = setup(model, tmp_path)
    x_t, t, context, added, x0, noise, harmful = tensors
    cfg = ImmunizeConfig(harmful_weight=-0.5, attack_weight=0.3, cap=cap)
    params = list(pipe.unet.parameters())
    ours, stats = loss_of(pipe, tensors, SimulatedAttack(0, 1e-3, 2), [], cfg)
    pred = pipe.unet(x_t, t, context, **added)
    weight, shift = (-0.8, 0.0) if cap == math.inf else (-0.5, -0.3 * cap * int(harmful.sum()) / len(harmful))
    naive, _ = safety_loss(pred, x_t, t, x0, noise, harmful, pipe.schedule, ContrastiveCentres(x0.shape[1:], generator),
                           SafetyLossConfig(lam=0.0, harmful_weight=weight))
    torch.testing.assert_close(ours, naive + shift, rtol=1e-6, atol=1e-7)
    for g_ours, g_naive in zip(torch.autograd.grad(ours, params), torch.autograd.grad(naive, params)):
        torch.testing.assert_close(g_ours, g_naive, rtol=1e-5, atol=1e-7)
    assert stats["inner_steps"] == 0


@pytest.mark.parametrize("inner_grad", ["first-order", "exact"])
def test_with_lt_and_no_attack_steps_the_loss_is_lts_and_the_general_path_agrees(model, tmp_path, inner_grad):
    """--immunize-with lt: LT's loss replaces the naive part. K = 0 through the general path (a separate forward
    at theta, as NG's x_t_attack takes) gives the shortcut's value and gradient, first-order or exact."""
    pipe, _, generator, tensors = setup(model, tmp_path)
    x_t, t, context, added, x0, noise, harmful = tensors
    params = list(pipe.unet.parameters())
    cfg = ImmunizeConfig(attack_weight=0.3, cap=math.inf, inner_grad=inner_grad)
    lt = SafetyLossConfig(lam=1e-2, harmful_weight=-0.5)
    centres = ContrastiveCentres(x0.shape[1:], generator)
    attack = SimulatedAttack(0, 1e-3, 2)

    def loss(**options):
        pred = pipe.unet(x_t, t, context, **added)
        base = safety_loss(pred, x_t, t, x0, noise, harmful, pipe.schedule, centres, lt, update_centres=False)
        value, stats = immunize_loss(pipe.unet, pred, x_t, t, context, added, x0, noise, harmful, pipe.schedule,
                                     attack, [], cfg, base=base, **options)
        return value, base[0], stats
    shortcut, base, stats = loss()
    general, _, _ = loss(x_t_attack=x_t)
    shift = -0.3 * stats["mse_harmful"] * int(harmful.sum()) / len(harmful)
    assert "contrastive" in stats and shortcut.item() == pytest.approx(base.item() + shift, rel=1e-5)
    torch.testing.assert_close(general, shortcut)
    for g_general, g_shortcut in zip(torch.autograd.grad(general, params), torch.autograd.grad(shortcut, params)):
        torch.testing.assert_close(g_general, g_shortcut, rtol=1e-4, atol=1e-6)


def test_first_order_gradient_is_the_post_attack_gradient_at_the_attacked_weights(model, tmp_path):
    """First order: d loss / d theta = grad of the naive part at theta + grad of the post-attack term taken at
    phi_K (the weights the attack left), computed here by hand with torch.func."""
    pipe, dataset, generator, tensors = setup(model, tmp_path)
    x_t, t, context, _, x0, noise, harmful = tensors
    names, params = zip(*pipe.unet.named_parameters())
    attack = SimulatedAttack(steps=2, lr=1e-3, batch_size=2)
    inner = inner_batches(pipe, dataset, attack, generator)
    cfg = ImmunizeConfig(harmful_weight=-0.5, attack_weight=0.7, cap=math.inf, inner_optimizer="sgd")
    ours, _ = loss_of(pipe, tensors, attack, inner, cfg)
    ours = torch.autograd.grad(ours, params)
    phi = {n: p.detach().clone() for n, p in zip(names, params)}
    for batch_x_t, batch_t, batch_context, _, batch_x0, batch_noise in inner:  # plain SGD, by hand
        phi = {n: p.requires_grad_(True) for n, p in phi.items()}
        pred = torch.func.functional_call(pipe.unet, phi, (batch_x_t, batch_t, batch_context))
        loss = (pred - pipe.schedule.target(batch_x0, batch_noise, batch_t)).pow(2).mean()
        grads = torch.autograd.grad(loss, list(phi.values()))
        phi = {n: (p - 1e-3 * g).detach() for (n, p), g in zip(phi.items(), grads)}
    phi = {n: p.requires_grad_(True) for n, p in phi.items()}
    rows = harmful.nonzero().flatten()
    after = torch.func.functional_call(pipe.unet, phi, (x_t[rows], t[rows], context[rows]))
    term = -0.7 * (after - pipe.schedule.target(x0[rows], noise[rows], t[rows])).pow(2).flatten(1).mean(1).sum()
    at_phi = torch.autograd.grad(term / len(harmful), list(phi.values()))
    pred = pipe.unet(x_t, t, context)
    mse = (pred - pipe.schedule.target(x0, noise, t)).pow(2).flatten(1).mean(1)
    naive = torch.autograd.grad((torch.where(harmful, -0.5, 1.0) * mse).mean(), params)
    for name, g_ours, g_naive, g_phi in zip(names, ours, naive, at_phi):
        torch.testing.assert_close(g_ours, g_naive + g_phi, rtol=1e-4, atol=1e-7, msg=name)


def test_first_order_and_exact_gradients_agree_to_order_lr(model, tmp_path):
    """One SGD inner step: exact = (I - lr H) first-order, so their relative difference shrinks like lr."""
    pipe, dataset, generator, tensors = setup(model, tmp_path, classes=(2, 2))
    params = list(pipe.unet.parameters())
    state = generator.get_state()

    def gradient(lr, inner_grad):
        generator.set_state(state)
        attack = SimulatedAttack(steps=1, lr=lr, batch_size=2)
        cfg = ImmunizeConfig(harmful_weight=0.0, cap=math.inf, inner_optimizer="sgd", inner_grad=inner_grad)
        loss, _ = loss_of(pipe, tensors, attack, inner_batches(pipe, dataset, attack, generator), cfg)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    def relative_difference(lr):
        exact, first = gradient(lr, "exact"), gradient(lr, "first-order")
        return ((exact - first).norm() / exact.norm()).item()
    differences = [relative_difference(lr) for lr in (1e-2, 1e-3, 1e-4)]
    for large, small in itertools.pairwise(differences):  # O(lr): ten times smaller lr, about ten times closer
        assert 0 < small < large / 5, differences
    assert differences[-1] < 100 * 1e-4  # on this model about 10 lr


def run(model, data, out, *extra, **overrides):
    """overrides: values set after parsing, where argparse refuses them (a NaN weight, to make the loss NaN)."""
    args = train.parse_args(["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                             "--quiet", "--lr", "1e-3", "--method", "immunize", *extra])
    return train.train(argparse.Namespace(**{**vars(args), **overrides}))


def unet_weights(folder):
    return msd.load_pipeline(folder, device="cpu").unet.state_dict()


@pytest.mark.parametrize("inner_grad, combined", [("first-order", []), ("exact", []),
                                                   ("first-order", ["--immunize-with", "ng", "--lambda", "1e-3"])])
def test_train_runs_two_steps_and_resumes_exactly(model, tmp_path, inner_grad, combined):
    data = write_data(tmp_path / "data", [1, 2, 1, 2, 2])
    common = ["--batch-size", "2", "--checkpoint-every", "1", "--inner-steps", "1,2", "--inner-batch-size", "1,2",
              "--inner-grad", inner_grad, *combined]
    straight = unet_weights(run(model, data, tmp_path / "straight", "--steps", "2", *common))
    run(model, data, tmp_path / "resumed", "--steps", "1", *common)
    resumed = unet_weights(run(model, data, tmp_path / "resumed", "--steps", "2", "--resume", *common))
    before = unet_weights(model)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(before[k], straight[k]) for k in before)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert {"loss", "mse_clean", "mse_harmful", "attacked_mse", "inner_loss_first", "inner_loss_last", "inner_steps",
            "inner_lr", "inner_batch", "grad_norm"} <= log[0].keys()
    assert all(1 <= row["inner_steps"] <= 2 and 3e-5 <= row["inner_lr"] <= 3e-4 for row in log)
    assert ("contrastive" in log[0]) == bool(combined)


def test_torchrun_is_refused_by_name(model, tmp_path, monkeypatch):
    monkeypatch.setattr(train.distributed, "setup", lambda device, batch_size: (True, 0, 2, "cpu"))
    with pytest.raises(ValueError, match="--method immunize does not run under torchrun"):
        run(model, write_data(tmp_path / "data", [1, 2]), tmp_path / "out", "--steps", "1")


def test_attacks_are_drawn_in_their_ranges_from_the_generator_and_options_parse():
    cfg = ImmunizeConfig(inner_steps=(0, 3), inner_lr=(1e-5, 1e-3), inner_batch=(2, 4))
    attacks = [draw_attack(cfg, torch.Generator().manual_seed(seed)) for seed in range(200)]
    assert {a.steps for a in attacks} == {0, 1, 2, 3} and {a.batch_size for a in attacks} == {2, 3, 4}
    assert all(1e-5 <= a.lr <= 1e-3 for a in attacks)
    assert draw_attack(cfg, torch.Generator().manual_seed(7)) == draw_attack(cfg, torch.Generator().manual_seed(7))
    args = train.parse_args(["--method", "immunize"])
    assert (args.preset, args.inner_steps, args.inner_lr, args.inner_batch_size, args.harmful_weight, args.lam) == \
        ("immunize", (1, 3), (3e-5, 3e-4), (1, 8), -0.5, 0.0)
    assert cli.int_range("2") == (2, 2)
    with pytest.raises(Exception, match="LOW,HIGH"):
        cli.positive_float_range("1e-3,1e-4")


def test_exact_gradient_runs_through_gradient_checkpointing(model, tmp_path):
    """CUDA's default: the inner forwards recompute under checkpointing and are still differentiated twice."""
    data = write_data(tmp_path / "data", [1, 2])
    common = ["--batch-size", "2", "--inner-steps", "1", "--inner-batch-size", "1", "--inner-grad", "exact",
              "--steps", "1"]
    plain = unet_weights(run(model, data, tmp_path / "plain", *common))
    checkpointed = unet_weights(run(model, data, tmp_path / "checkpointed", "--gradient-checkpointing", *common))
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7) for k in plain)


def test_nan_stops_before_the_update_and_bad_settings_are_refused(model, tmp_path):
    data = write_data(tmp_path / "data", [1, 2])
    with pytest.raises(SystemExit, match=r"step 0: the loss is nan"):
        run(model, data, tmp_path / "nan", "--steps", "1", "--batch-size", "2", attack_weight=math.nan)
    with pytest.raises(ValueError, match="--method immunize has no contrastive term"):
        run(model, data, tmp_path / "lambda", "--lambda", "1e-3")
    with pytest.raises(ValueError, match="harmful rows: .* has 2 rows, none of them harmful"):
        run(model, write_data(tmp_path / "clean", [1, 1]), tmp_path / "clean-run", "--steps", "1")
