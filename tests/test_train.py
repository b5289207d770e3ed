"""train.py on a tiny random model: the contrastive term trains the UNet, resume is exact, NaN stops."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from builders import write_data
from oracles import oracle

import mini_safediff as msd
from mini_safediff.methods.contrastive import ContrastiveCentres, LatentTransformation, SafetyLossConfig, safety_loss
from mini_safediff.training.checkpoints import load_checkpoint
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.optim import AdamWBF16, adamw
from mini_safediff.training.steps import draw_noise_and_timesteps, encode_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


def run(model, data, out, *extra, **overrides):
    """overrides: values set after parsing, where argparse refuses them (a NaN lambda, to make the loss NaN)."""
    args = train.parse_args(["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                             "--quiet", "--lr", "1e-3", "--weight-decay", "0", *extra])
    return train.train(argparse.Namespace(**{**vars(args), **overrides}))


def unet_weights(folder):
    return msd.load_pipeline(folder, device="cpu").unet.state_dict()


@pytest.mark.parametrize("contrast_grad", [True, False])
def test_contrastive_term_alone_carries_gradient(model, tmp_path, contrast_grad):
    pipe = msd.load_pipeline(model, device="cpu")
    dataset = SafetyDataset(write_data(tmp_path / "data", [2, 2]), 16)
    batch = load_batch(dataset, 2, 0, seed=0)
    generator = torch.Generator().manual_seed(0)
    x0, context, added = encode_batch(pipe, batch, generator)
    noise, t = draw_noise_and_timesteps(x0, 1000, generator)
    x_t = pipe.schedule.add_noise(x0, noise, t)
    unet = pipe.unet.train().requires_grad_(True)
    config = SafetyLossConfig(method="lt", lam=1.0, harmful_weight=0.0, contrast_grad=contrast_grad)
    loss, _ = safety_loss(unet(x_t, t, context, **added), x_t, t, x0, noise, batch["harmful"], pipe.schedule,
                          ContrastiveCentres(x0.shape[1:], generator), config)
    loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in unet.parameters()]).norm().item()
    assert loss.item() != 0
    assert (grad_norm > 0) if contrast_grad else (grad_norm == 0)


def test_sdxl_trains_and_resumes_exactly(sdxl_model, tmp_path):
    """Two steps on a tiny SDXL model, straight and as 1 + 1 with a resume: the same UNet, which moved."""
    data = write_data(tmp_path / "data", [1, 2, 1, 2])
    common = ["--batch-size", "2", "--lambda", "1e-3", "--checkpoint-every", "1"]
    straight = unet_weights(run(sdxl_model, data, tmp_path / "straight", "--steps", "2", *common))
    run(sdxl_model, data, tmp_path / "resumed", "--steps", "1", *common)
    resumed = unet_weights(run(sdxl_model, data, tmp_path / "resumed", "--steps", "2", "--resume", *common))
    before = unet_weights(sdxl_model)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not torch.equal(before["add_embedding.linear_1.weight"], straight["add_embedding.linear_1.weight"])
    assert msd.load_pipeline(tmp_path / "resumed" / "model.safetensors", device="cpu").is_sdxl


def test_sdxl_batch_conditioning_is_what_the_unet_takes(sdxl_model, tmp_path):
    pipe = msd.load_pipeline(sdxl_model, device="cpu")
    batch = load_batch(SafetyDataset(write_data(tmp_path / "data", [1, 2]), 16), 2, 0, seed=0)
    x0, context, added = encode_batch(pipe, batch, torch.Generator().manual_seed(0))
    assert context.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 24)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # the training resolution, no crop
    assert torch.equal(context, pipe.encode_prompts(batch["text"]))


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
    StableDiffusionPipeline = oracle("diffusers").StableDiffusionPipeline

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
        run(model, data, tmp_path / "out", "--steps", "4", "--resume", "--allow-changed-settings", lam=float("nan"))
    kept = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert kept["step"] == 2
    assert all(torch.equal(good["unet"][k], kept["unet"][k]) for k in good["unet"])


def test_the_log_averages_a_step_over_its_micro_batches(model, tmp_path, monkeypatch):
    seen = []

    def recording_loss(self, pred, batch):
        loss, stats = method_loss(self, pred, batch)
        seen.append(stats)
        return loss, stats
    method_loss = LatentTransformation.loss
    monkeypatch.setattr(LatentTransformation, "loss", recording_loss)
    run(model, write_data(tmp_path / "data", [1, 2, 1]), tmp_path / "out", "--steps", "2", "--grad-accum", "3",
        "--batch-size", "1")
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(seen) == 6 and len(log) == 2
    for row, micro in zip(log, (seen[:3], seen[3:])):
        assert len({stats["mse"] for stats in micro}) == 3  # three different micro-batches
        for key in micro[0]:
            assert row[key] == pytest.approx(sum(stats[key] for stats in micro) / 3, rel=1e-12), key


def optimize(optimizer_class, weights, gradients, **options):
    """The weights after one optimizer step per gradient."""
    weights = weights.clone().requires_grad_(True)
    optimizer = optimizer_class([weights], **options)
    for gradient in gradients:
        weights.grad = gradient.clone()
        optimizer.step()
    return weights.detach(), optimizer


def test_adam_bf16_equals_adamw_where_bfloat16_holds_the_states_exactly():
    # Gradients in {+-0.5, +-1, +-2} with betas 0.5: three steps of moments need at most 7 significant bits.
    weights, generator = torch.randn(1000), torch.Generator().manual_seed(0)
    gradients = [torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])[torch.randint(0, 6, (1000,), generator=generator)]
                 for _ in range(3)]
    options = dict(lr=1e-2, betas=(0.5, 0.5), weight_decay=0.1)
    ours, optimizer = optimize(AdamWBF16, weights, gradients, **options)
    theirs, _ = optimize(torch.optim.AdamW, weights, gradients, foreach=False, **options)
    assert torch.equal(ours, theirs)
    state = next(iter(optimizer.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_adam_bf16_stays_close_to_adamw():
    # Each stored moment is off by at most one bfloat16 step (2^-7 relative), at random in both directions.
    weights, generator = torch.randn(10000), torch.Generator().manual_seed(0)
    gradients = [torch.randn(10000, generator=generator) + 0.5 for _ in range(20)]
    ours, _ = optimize(AdamWBF16, weights, gradients, lr=1e-3)
    theirs, _ = optimize(torch.optim.AdamW, weights, gradients, lr=1e-3, foreach=False)
    assert (ours - theirs).abs().mean() <= 2 ** -7 * (theirs - weights).abs().mean()


def test_adam_bf16_second_moment_decays_thanks_to_stochastic_rounding():
    # Rounded to nearest, 0.999 v would round back to v at every step and v would never decay.
    weights = torch.randn(10000)
    gradients = [torch.ones(10000)] + [torch.zeros(10000)] * 100
    _, ours = optimize(AdamWBF16, weights, gradients, lr=1e-3)
    _, theirs = optimize(torch.optim.AdamW, weights, gradients, lr=1e-3, foreach=False)
    v_ours, v_theirs = (next(iter(o.state.values()))["exp_avg_sq"].float().mean().item() for o in (ours, theirs))
    assert v_theirs == pytest.approx(1e-3 * 0.999 ** 100, rel=1e-4)
    assert v_ours == pytest.approx(v_theirs, rel=2e-3)


def test_adam_bf16_rounds_alike_whatever_the_global_random_state():
    # DDP ranks and resumed runs must round identically: the rounding bits depend on the step number only.
    weights, gradients = torch.randn(1000), [torch.randn(1000) for _ in range(3)]
    torch.manual_seed(1)
    first, _ = optimize(AdamWBF16, weights, gradients)
    torch.manual_seed(2)
    second, _ = optimize(AdamWBF16, weights, gradients)
    assert torch.equal(first, second)


def test_adamw_is_fused_and_equals_the_per_tensor_adamw():
    weights, generator = torch.randn(10000), torch.Generator().manual_seed(0)
    gradients = [torch.randn(10000, generator=generator) for _ in range(10)]
    ours, optimizer = optimize(adamw, weights, gradients, lr=1e-3, weight_decay=0.01)
    theirs, _ = optimize(torch.optim.AdamW, weights, gradients, lr=1e-3, foreach=False)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # float rounding only: the steps move them 3e-3
    assert (ours - weights).abs().mean() > 1e-3


def test_adam_bf16_refuses_low_precision_weights():
    with pytest.raises(ValueError, match="float32 weights; got a torch.bfloat16 parameter"):
        optimize(AdamWBF16, torch.randn(4).bfloat16(), [torch.randn(4).bfloat16()])


def test_adam_bf16_checkpoints_keep_bf16_states_and_resume_exactly(model, tmp_path):
    data = write_data(tmp_path / "data", [1, 2, 1, 2, 1])
    common = ["--adam-bf16", "--batch-size", "2", "--lambda", "1e-3", "--checkpoint-every", "2"]
    straight = unet_weights(run(model, data, tmp_path / "straight", "--steps", "4", *common))
    run(model, data, tmp_path / "resumed", "--steps", "2", *common)
    states = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["optimizer"]["state"].values()
    assert {state[key].dtype for state in states for key in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    resumed = unet_weights(run(model, data, tmp_path / "resumed", "--steps", "4", "--resume", *common))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
