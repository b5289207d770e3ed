"""ESD (methods/esd.py) in train.py on a tiny random model: the target formula, which weights each variant
trains, exact resume, and its options."""
import json
import sys
from pathlib import Path

import pytest
import torch

import mini_safediff as msd
from mini_safediff.methods.esd import DDIM_STEPS, esd_batch, esd_target, trains

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

CONCEPT = "a handwritten digit seven"


def run(model, out, *extra):
    args = ["--model", str(model), "--out", str(out), "--device", "cpu", "--quiet", "--lr", "1e-3",
            "--concept", CONCEPT, *extra]
    return train.train(train.parse_args(args))


def unet_weights(folder):
    return msd.load_pipeline(folder, device="cpu").unet.state_dict()


def test_target_is_negative_guidance_of_the_frozen_model(model):
    pipe = msd.load_pipeline(model, device="cpu")
    generator = torch.Generator().manual_seed(0)
    x_t, t, context, added, target = esd_batch(pipe, pipe.unet, [CONCEPT], 2, 1.5, generator)
    assert x_t.shape == (2, 4, 8, 8) and t.shape == (2,) and added == {}
    with torch.no_grad():
        e_empty = pipe.unet(x_t, t, pipe.encode_prompts(["", ""]))
        e_concept = pipe.unet(x_t, t, pipe.encode_prompts([CONCEPT] * 2))
    torch.testing.assert_close(target, e_empty - 1.5 * (e_concept - e_empty), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context, pipe.encode_prompts([CONCEPT] * 2))
    # at eta = 0 the target is the unconditional prediction: ESD with no push is "forget the text"
    torch.testing.assert_close(esd_target(pipe.unet, x_t, t, (context, {}), (pipe.encode_prompts(["", ""]), {}), 0.0),
                               e_empty, rtol=1e-5, atol=1e-5)


def test_x_t_is_partial_ddim_sampling_of_the_concept_and_t_lies_in_k_s_interval(model, monkeypatch):
    """k drawn first: x_t is what ESD's script samples (DDIM with guidance 3, stopped after DDIM_STEPS - k + 1
    steps), t in [20 k, 20 k + 20)."""
    from mini_safediff.models import samplers

    pipe = msd.load_pipeline(model, device="cpu")
    calls = []
    ddim = samplers.ddim
    monkeypatch.setattr(samplers, "ddim", lambda *a, **kw: calls.append(kw["stop_after"]) or ddim(*a, **kw))
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    x_t, t, *_ = esd_batch(pipe, pipe.unet, [CONCEPT], 1, 1.0, generator)
    generator.set_state(state)
    k = int(torch.randint(0, DDIM_STEPS, (), generator=generator))
    assert calls == [min(DDIM_STEPS, DDIM_STEPS - k + 1)]
    assert 20 * k <= t.item() < 20 * (k + 1)
    t_draw = torch.randint(20 * k, 20 * (k + 1), (1,), generator=generator)
    torch.randint(0, 1, (1,), generator=generator)
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    expected = samplers.ddim(pipe.guided_model([CONCEPT], [""], 3.0, 16, 16), noise, pipe.schedule, DDIM_STEPS,
                             progress=False, stop_after=calls[0])
    assert t.item() == t_draw.item() and torch.equal(x_t, expected)


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_each_variant_changes_exactly_its_weights(model, tmp_path, method):
    before = unet_weights(model)
    after = unet_weights(run(model, tmp_path / method, "--method", method, "--steps", "2"))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    cross_attention = {key for key in before if ".attn2." in key}
    untouched = {key for key in before if key.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    if method == "esd-x":
        assert changed == cross_attention
    else:
        assert changed and not changed & (cross_attention | untouched)
        assert changed == set(before) - cross_attention - untouched
    assert {key for key in before if trains(key, method)} == (cross_attention if method == "esd-x" else
                                                             set(before) - cross_attention - untouched)


def test_resume_is_exact(model, tmp_path):
    common = ["--method", "esd-u", "--batch-size", "2", "--checkpoint-every", "2", "--concept", "a cat"]
    straight = unet_weights(run(model, tmp_path / "straight", "--steps", "4", *common))
    run(model, tmp_path / "resumed", "--steps", "2", *common)
    resumed = unet_weights(run(model, tmp_path / "resumed", "--steps", "4", "--resume", *common))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert {"lr", "loss", "target_norm", "grad_norm", "seconds"} <= log[0].keys()


def test_esd_preset_is_the_papers_and_options_belong_to_their_methods(model, tmp_path):
    args = train.parse_args(["--method", "esd-x", "--concept", CONCEPT])
    assert (args.preset, args.steps, args.lr, args.batch_size, args.weight_decay, args.negative_guidance) == \
        ("esd", 1000, 1e-5, 1, 0.0, 1.0)
    assert train.parse_args([]).preset == "paper"
    with pytest.raises(ValueError, match="--method esd-u erases a concept: give it with --concept TEXT"):
        train.train(train.parse_args(["--method", "esd-u", "--model", str(model), "--out", str(tmp_path / "a")]))
    with pytest.raises(ValueError, match="--method esd-u is data-free: it takes no --data"):
        train.train(train.parse_args(["--method", "esd-u", "--concept", "x", "--data", str(tmp_path)]))
    with pytest.raises(ValueError, match="--concept is an option of --method esd-u / esd-x, not of lt"):
        train.train(train.parse_args(["--method", "lt", "--concept", "x"]))
