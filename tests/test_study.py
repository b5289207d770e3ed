"""The study plan's expansion into runs: their counts, dependencies, and keys that change with every setting."""
import dataclasses
import sys
from pathlib import Path

import pytest

from mini_safediff.miniature.study import PLAN, Model, Plan, expand, weights_digest
from mini_safediff.models.pipeline import BUILTIN_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attack  # noqa: E402
import train  # noqa: E402

DIGESTS = {"base": "base-weights", "unseen": "unseen-unet"}


def keys(plan=PLAN, digests=DIGESTS) -> dict:
    return {(run.kind, run.model, run.train_seed, run.attack, run.attack_seed, run.step): run.key
            for run in expand(plan, digests)}


def test_expansion_counts_and_order():
    runs = expand(PLAN, DIGESTS)
    trained = [name for name, model in PLAN.models.items() if model.train is not None]
    untrained = len(PLAN.models) - len(trained)
    weights = len(trained) * len(PLAN.train_seeds) + untrained  # base and unseen: one model each
    attacks = weights * len(PLAN.attacks) * len(PLAN.attack_seeds)
    by_kind = {kind: [run for run in runs if run.kind == kind] for kind in ("train", "attack", "evaluate")}
    assert (len(trained), untrained) == (10, 2)
    assert len(by_kind["train"]) == 10 * 3 and len(by_kind["attack"]) == attacks == 32 * 2 * 2
    assert len(by_kind["evaluate"]) == weights + attacks * (len(PLAN.snapshots) - 1) == 32 + 128 * 8
    assert len({run.key for run in runs}) == len(runs)  # no two runs share a key
    seen = set()
    for run in runs:  # every run comes after the runs it reads
        assert set(run.needs) <= seen
        seen.add(run.key)
    train = {(run.model, run.train_seed): run for run in by_kind["train"]}
    for seed in PLAN.train_seeds:  # reinforcement starts from naive of the same training seed
        assert train["naive+lt", seed].needs == (train["naive", seed].key,)
    assert all(run.needs == () for run in runs if run.model in ("base", "unseen") and run.kind == "attack")


def test_identical_settings_give_identical_keys():
    assert keys() == keys(Plan(), dict(DIGESTS))


@pytest.mark.parametrize("change", [
    {"snapshots": (0, 10, 20, 30, 50, 75, 100, 150, 250)},
    {"train_seeds": (0, 1, 3)},
    {"attack_seeds": (0, 2)},
    {"images_per_prompt": 16},
    {"harmful_images_per_prompt": 64},
    {"sampling_steps": 25},
    {"guidance": 7.5},
    {"image_seed": 1},
    {"harmful_digits": (3,)},
    {"attacks": {**PLAN.attacks, "strong": ("--preset", "miniature", "--lr", "2e-4")}},
    {"models": {**PLAN.models, "naive": Model(train=("--preset", "miniature", "--lambda", "0", "--steps", "300"))}},
])
def test_every_setting_changes_the_keys_it_defines(change):
    before, after = keys(), keys(dataclasses.replace(PLAN, **change))
    changed = {run for run, key in after.items() if key not in set(before.values())}  # runs never made before
    assert changed, change
    if "models" in change:  # naive's runs and everything made from naive change; other models do not
        assert {run[1] for run in changed} == {"naive", "naive+lt", "naive+ng"}
    if "attacks" in change:
        assert {run[3] for run in changed} == {"strong"}
    if "images_per_prompt" in change:
        assert {run[0] for run in changed} == {"evaluate"}


def test_new_weights_change_every_key_made_from_them():
    before = keys()
    new_base = keys(digests={**DIGESTS, "base": "retrained"})
    assert all(before[run] != new_base[run] for run in before)
    new_unseen = keys(digests={**DIGESTS, "unseen": "retrained"})
    assert {run[1] for run in before if before[run] != new_unseen[run]} == {"unseen"}


def test_weights_digest(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    first = weights_digest(tmp_path)
    assert weights_digest(tmp_path) == first
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weightz")
    assert weights_digest(tmp_path) != first
    with pytest.raises(ValueError, match="no weights"):
        weights_digest(tmp_path / "missing")


def test_bad_starts_are_refused():
    cycle = {"a": Model(train=("--steps", "1"), start="b"), "b": Model(train=("--steps", "1"), start="a")}
    with pytest.raises(ValueError, match="cycle"):
        expand(dataclasses.replace(PLAN, models=cycle), DIGESTS)
    with pytest.raises(ValueError, match="not a trained plan model"):
        expand(dataclasses.replace(PLAN, models={"a": Model(train=("--steps", "1"), start="base2")}), DIGESTS)


def test_every_plan_argument_is_one_train_py_and_attack_py_take():
    for name, model in PLAN.models.items():
        if model.train is not None:
            args = train.parse_args(list(model.train))
            assert args.steps > 0 and args.lr > 0, name
    official = train.parse_args(list(PLAN.models["high-official"].train))
    assert (official.batch_size, official.grad_accum, official.lr_schedule, official.warmup, official.balanced,
            official.no_contrast_grad, official.harmful_weight) == (1, 4, "cosine", 0, False, True, -0.5)
    paper, strong = (attack.parse_args(list(PLAN.attacks[name])) for name in ("paper", "strong"))
    assert (paper.lr, paper.batch_size, strong.lr, strong.batch_size) == (1e-5, 1, 1e-4, 8)


def test_the_shipped_weights_key_the_plan(tmp_path):
    assert len(expand(PLAN)) == len(expand(PLAN, DIGESTS))  # the digests of weights/ and weights/unseen
    copy = tmp_path / "weights"
    for path in BUILTIN_MODEL.rglob("*"):
        if path.is_file() and "unseen" not in path.parts:
            (copy / path.relative_to(BUILTIN_MODEL)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(BUILTIN_MODEL)).write_bytes(path.read_bytes())
    assert weights_digest(copy) == weights_digest(BUILTIN_MODEL)  # the base's key ignores the unseen UNet in it
