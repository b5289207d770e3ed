"""The study plan's expansion into runs: their counts, dependencies, and keys that change with every setting."""
import dataclasses
import sys
from pathlib import Path

import pytest

from mini_safediff.miniature.study import MAIN, PLAN, Model, Plan, expand, weights_digest
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
    # base, unseen, sld-medium, sld-max; the SLD rows share base's weights, hence its attack runs
    untrained = [name for name, model in PLAN.models.items() if model.train is None]
    weights = {name: len(PLAN.train_seeds) if name in trained else 1 for name in PLAN.models}
    assert (len(trained), len(untrained)) == (15, 4)
    by_kind = {kind: [run for run in runs if run.kind == kind] for kind in ("train", "attack", "evaluate")}
    attacked = {name: [model for model in PLAN.models if attack.models is None or model in attack.models]
                for name, attack in PLAN.attacks.items()}
    attack_runs = sum(weights[model] * len(PLAN.attacks[name].seeds) for name, models in attacked.items()
                      for model in models if not PLAN.models[model].sample)
    evaluations = sum(weights.values()) + sum(
        weights[model] * len(PLAN.attacks[name].seeds) * (len(PLAN.attacks[name].snapshots) - 1)
        for name, models in attacked.items() for model in models)
    assert len(by_kind["train"]) == 15 * 3
    assert len(by_kind["attack"]) == attack_runs == 47 * 5 + 8 * 2
    assert len(by_kind["evaluate"]) == evaluations
    assert len({run.key for run in runs}) == len(runs)  # no two runs share a key
    seen = set()
    for run in runs:  # every run comes after the runs it reads
        assert set(run.needs) <= seen
        seen.add(run.key)
    train = {(run.model, run.train_seed): run for run in by_kind["train"]}
    for seed in PLAN.train_seeds:  # reinforcement starts from the safe model of the same training seed
        assert train["naive+lt", seed].needs == (train["naive", seed].key,)
        assert train["esd-u+ng", seed].needs == (train["esd-u", seed].key,)
    assert all(run.needs == () for run in runs if run.model in ("base", "unseen") and run.kind == "attack")
    prompt_attacks = [run for run in runs if run.kind == "prompt-attack"]
    assert len(prompt_attacks) == 2 + 7 * 3  # base, unseen; seven trained models x 3 seeds
    assert len(runs) == sum(map(len, by_kind.values())) + len(prompt_attacks)
    evaluated = {run.model for run in by_kind["evaluate"]}
    assert evaluated == set(PLAN.models)  # the SLD rows judge base's attacked weights with SLD sampling


def test_the_main_table_is_a_part_of_the_study():
    study = {run.key for run in expand(PLAN, DIGESTS)}
    main = expand(MAIN, DIGESTS)
    assert {run.model for run in main} == {"base", "unseen", "naive", "lt", "ng"}
    assert {run.kind for run in main} == {"train", "attack", "evaluate"}  # no prompt attacks: it stays quick
    assert {run.key for run in main} <= study  # the study reuses every run of the main table


def test_identical_settings_give_identical_keys():
    assert keys() == keys(Plan(), dict(DIGESTS))


@pytest.mark.parametrize("change", [
    {"attacks": {**PLAN.attacks, "strong": dataclasses.replace(PLAN.attacks["strong"], snapshots=(0, 10, 250))}},
    {"train_seeds": (0, 1, 3)},
    {"attacks": {**PLAN.attacks, "strong": dataclasses.replace(PLAN.attacks["strong"], seeds=(0, 2))}},
    {"images_per_prompt": 16},
    {"harmful_images_per_prompt": 64},
    {"sampling_steps": 25},
    {"guidance": 7.5},
    {"image_seed": 1},
    {"harmful_digits": (3,)},
    {"attacks": {**PLAN.attacks, "strong": dataclasses.replace(PLAN.attacks["strong"],
                                                               args=("--preset", "miniature", "--lr", "2e-4"))}},
    {"models": {**PLAN.models, "naive": Model(train=("--preset", "miniature", "--lambda", "0", "--steps", "300"))}},
])
def test_every_setting_changes_the_keys_it_defines(change):
    before, after = keys(), keys(dataclasses.replace(PLAN, **change))
    changed = {run for run, key in after.items() if key not in set(before.values())}  # runs never made before
    assert changed, change
    if "models" in change:  # naive's runs and everything made from naive change; other models do not
        assert {run[1] for run in changed} == {"naive", "naive+lt", "naive+ng"}
    if "attacks" in change and "seeds" not in str(change):
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
    paper, strong, lora = (attack.parse_args(list(PLAN.attacks[name].args)) for name in ("paper", "strong", "lora"))
    assert (paper.lr, paper.batch_size, strong.lr, strong.batch_size) == (1e-5, 1, 1e-4, 8)
    assert (lora.lora_rank, lora.lr, lora.batch_size) == (4, 1e-3, 8)
    # the immunization's simulated attacks are held out from every evaluation attack: lr, batch, steps
    immunize = train.parse_args(list(PLAN.models["immunize"].train))
    for evaluation in (paper, strong, lora):
        assert not immunize.inner_lr[0] <= evaluation.lr <= immunize.inner_lr[1]
        assert not immunize.inner_batch_size[0] <= evaluation.batch_size <= immunize.inner_batch_size[1]
    assert max(immunize.inner_steps) < min(min(s for s in a.snapshots if s) for a in PLAN.attacks.values())


def test_the_shipped_weights_key_the_plan(tmp_path):
    assert len(expand(PLAN)) == len(expand(PLAN, DIGESTS))  # the digests of weights/ and weights/unseen
    copy = tmp_path / "weights"
    for path in BUILTIN_MODEL.rglob("*"):
        if path.is_file() and "unseen" not in path.parts:
            (copy / path.relative_to(BUILTIN_MODEL)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(BUILTIN_MODEL)).write_bytes(path.read_bytes())
    assert weights_digest(copy) == weights_digest(BUILTIN_MODEL)  # the base's key ignores the unseen UNet in it
