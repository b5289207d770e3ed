"""The study's machinery end to end on a tiny budget (runner.py, report.py): every run made once, resumable, never
served from a run with other settings, failures carried to the rows that need them, tables and figures."""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mini_safediff.miniature import runner
from mini_safediff.miniature.experiment import real_clean_features
from mini_safediff.miniature.judge import load_judge
from mini_safediff.miniature.report import markdown, study_report, write_report
from mini_safediff.miniature.study import MODELS, Attack, Model, Plan, expand

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and attack.py
import attack  # noqa: E402
import train  # noqa: E402

ENTRY_POINTS = {"train": train.main, "attack": attack.main}  # what evaluate.py hands the runner

TINY = Plan(models={"base": MODELS["base"], "unseen": MODELS["unseen"], "sld-max": MODELS["sld-max"],
                    "naive": Model(train=("--preset", "miniature", "--lambda", "0", "--steps", "2")),
                    "naive+lt": Model(train=("--preset", "miniature", "--steps", "1", "--harmful-weight", "0"),
                                      start="naive")},
            attacks={"strong": Attack(("--preset", "miniature"), (0, 1, 2), seeds=(0,)),
                     "clean": Attack(("--preset", "miniature"), (0, 1), seeds=(0,), rows="clean")},
            train_seeds=(0,), images_per_prompt=1, harmful_images_per_prompt=2, sampling_steps=2,
            prompt_attack=("--timesteps", "1", "--iterations", "2", "--sampling-steps", "2"), prompt_attack_models=("naive",))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    runs = tmp_path_factory.mktemp("study")
    failed = runner.run_plan(TINY, runs, ENTRY_POINTS, workers=0, quiet=True)
    return runs, failed


def test_every_run_is_made_and_judged(tiny_study):
    runs, failed = tiny_study
    assert failed == {}
    root = runner.study_root(runs)
    plan_runs = expand(TINY)
    assert all(runner.is_done(root, run) for run in plan_runs)
    cells = runner.load_cells(TINY, runs)
    evaluations = [run for run in plan_runs if run.kind == "evaluate"]
    prompt_attack = next(run for run in plan_runs if run.kind == "prompt-attack")
    assert len(cells) == len(evaluations) + 1 and len(evaluations) == 5 * (1 + 2 + 1)  # before; strong 1, 2; clean 1
    assert prompt_attack.model == "naive" and len(cells[prompt_attack.key]["results"]) == 4  # the 4 digit-7 prompts
    cell = cells[evaluations[0].key]
    assert cell["harmful_hit"].shape == cell["harmful_prob"].shape == (4 * 2,)
    assert cell["clean_correct"].shape == (9 * 4,) and cell["clean_features"].shape == (9 * 4, 64)
    assert cell["images"].shape == (44, 16, 16, 3) and str(cell["broken"]) == ""
    # the attacked SLD row judges base's attacked weights: the same attack run, other images
    by = {(run.model, run.attack, run.step): run for run in evaluations}
    assert by["sld-max", "strong", 2].needs == by["base", "strong", 2].needs
    assert not np.array_equal(cells[by["sld-max", "strong", 2].key]["images"],
                              cells[by["base", "strong", 2].key]["images"])


def test_a_second_call_makes_nothing(tiny_study, monkeypatch):
    runs, _ = tiny_study
    monkeypatch.setattr(runner, "_execute", lambda *a: pytest.fail(f"remade {a[0]}"))
    assert runner.run_plan(TINY, runs, ENTRY_POINTS, workers=0, quiet=True) == {}


def test_a_changed_setting_is_never_served_from_an_old_run(tiny_study, monkeypatch):
    runs, _ = tiny_study
    root = runner.study_root(runs)
    changed = dataclasses.replace(TINY, models={**TINY.models, "naive": Model(
        train=("--preset", "miniature", "--lambda", "0", "--steps", "2", "--lr", "1e-5"))})
    todo = {(run.kind, run.model) for run in expand(changed) if not runner.is_done(root, run)}
    # naive and what is made from it are made again; nothing else is
    assert {model for _, model in todo} == {"naive", "naive+lt"}
    assert {kind for kind, _ in todo} == {"train", "attack", "evaluate", "prompt-attack"}
    fewer_images = dataclasses.replace(TINY, harmful_images_per_prompt=3)
    assert {run.kind for run in expand(fewer_images) if not runner.is_done(root, run)} == {"evaluate"}
    evaluations = {run.key for run in expand(fewer_images) if run.kind == "evaluate"}
    assert not evaluations & set(runner.load_cells(fewer_images, runs))  # no old cell is served


def test_a_failed_run_fails_what_needs_it(tmp_path):
    plan = dataclasses.replace(TINY, models={"base": MODELS["base"],
                                             "bad": Model(train=("--steps", "1", "--lr", "1e300")),
                                             "bad+lt": Model(train=("--steps", "1",), start="bad")},
                               attacks={"strong": TINY.attacks["strong"]})
    failed = runner.run_plan(plan, tmp_path, ENTRY_POINTS, workers=0, quiet=True)
    runs = {run.key: run for run in expand(plan)}
    assert {runs[key].model for key in failed} == {"bad", "bad+lt"}
    train = next(key for key in failed if runs[key].kind == "train" and runs[key].model == "bad")
    assert "not finite" in failed[train] or "diverg" in failed[train], failed[train]
    assert all("needs a run that failed" in why for key, why in failed.items() if key != train)
    report = study_report(plan, runner.load_cells(plan, tmp_path), np.random.default_rng(0).normal(size=(50, 64)))
    bad = [row for row in report["rows"] if row["model"] == "bad"]
    assert bad and all(row["broken"].startswith("missing") for row in bad)
    assert "harmful_rate" in next(row for row in report["rows"] if row["model"] == "base")


def test_tables_rows_and_figures(tiny_study, tmp_path):
    runs, _ = tiny_study
    cells = runner.load_cells(TINY, runs)
    report = study_report(TINY, cells, real_clean_features(load_judge(), TINY.harmful_digits))
    rows = report["rows"]
    assert len(rows) == 5 * (1 + 2) + 5 * 1  # every model: before, strong 1 and 2, clean 1
    for row in rows:
        assert {"model", "attack", "attack_steps", "seeds", "harmful_rate", "harmful_rate_ci", "harmful_score",
                "clean_accuracy", "clean_accuracy_ci", "fd", "fd_ci", "n_images"} <= set(row)
        for name in ("harmful_rate", "clean_accuracy", "fd"):
            low, high = row[f"{name}_ci"]
            assert low <= row[name] <= high or name == "fd" and low <= high
    assert {row["attack"] for row in rows} == {"none", "strong", "clean fine-tuning"}
    recovery = {row["model"]: row for row in report["recovery"]}
    assert set(recovery) == set(TINY.models)
    assert "steps_to_half_vs_naive" in recovery["naive+lt"] and "auc_vs_unseen" in recovery["naive"]
    assert "auc_vs_naive" not in recovery["naive"]  # no model is compared with itself
    (asr,) = report["prompt_attack"]
    assert asr["model"] == "naive" and asr["prompts"] == 4 and asr["asr_ci"][0] <= asr["asr"] <= asr["asr_ci"][1]
    table = markdown(report, TINY)
    sections = table.split("### ")[1:]
    titles = [section.splitlines()[0] for section in sections]
    assert [title.split(" ")[0].rstrip(":") for title in titles] == ["Harmful", "Clean", "Safety", "Safety", "Clean",
                                                                     "Recovery", "UnlearnDiffAtk"]
    for section in sections:  # each table: a header, a rule and a line per model (recovery: per model and attack)
        lines = [line for line in section.splitlines() if line.startswith("|")]
        models = {"Safety reinforcement": 2, "Safety alignment": 4, "UnlearnDiffAtk": 1}.get(
            section[:20].rsplit(" (", 1)[0].strip(), 5)
        assert len(lines) == 2 + models, section
    write_report(report, TINY, cells, tmp_path / "results")
    written = {path.name for path in (tmp_path / "results").iterdir()}
    assert {"results.json", "results.md", "grid-naive-before.png", "grid-naive-strong-2.png"} <= written
    pytest.importorskip("matplotlib")
    assert {"recovery.png", "clean-accuracy.png"} <= written
    assert json.loads((tmp_path / "results" / "results.json").read_text())["rows"][0]["model"] == "base"


def test_recovery_lines_of_different_models_differ_in_dashes_and_markers(tiny_study, tmp_path, monkeypatch):
    """Two models with equal curves lie on top of each other: colour alone would hide one of them."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from mini_safediff.miniature.report import plot

    runs, _ = tiny_study
    cells = runner.load_cells(TINY, runs)
    report = study_report(TINY, cells, real_clean_features(load_judge(), TINY.harmful_digits))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(report, TINY, tmp_path)
    for figure in figures:
        for axis in figure.axes:
            styles = [(line.get_linestyle(), line.get_marker()) for line in axis.get_lines()]
            assert len(styles) > 1 and len(set(styles)) == len(styles), styles


def test_a_killed_study_continues_where_it_stopped(tmp_path, monkeypatch):
    plan = dataclasses.replace(TINY, models={name: TINY.models[name] for name in ("unseen", "naive")},
                               attacks={"strong": TINY.attacks["strong"]}, prompt_attack_models=())
    assert runner.run_plan(plan, tmp_path, ENTRY_POINTS, workers=0, quiet=True) == {}
    root = runner.study_root(tmp_path)
    plan_runs = expand(plan)
    train = next(run for run in plan_runs if run.kind == "train" and run.model == "naive")
    cell = next(run for run in plan_runs if run.kind == "evaluate" and run.model == "unseen" and run.step == 2)
    # killed after the training's last checkpoint but before its done.json, and before that cell was written
    (runner.output_path(root, train) / "done.json").unlink()
    runner.output_path(root, cell).unlink()
    made, execute = [], runner._execute
    monkeypatch.setattr(runner, "_execute", lambda kind, arguments, folder, entry_points:
                        made.append(Path(folder)) or execute(kind, arguments, folder, entry_points))
    assert runner.run_plan(plan, tmp_path, ENTRY_POINTS, workers=0, quiet=True) == {}
    assert made == [runner.output_path(root, train), runner.output_path(root, cell)]
    assert "--resume" in json.loads((runner.output_path(root, train) / "done.json").read_text())["argv"]


def test_worker_processes_make_the_same_cells_as_this_process(tiny_study, tmp_path):
    runs, _ = tiny_study
    plan = dataclasses.replace(TINY, models={"base": TINY.models["base"]}, attacks={"strong": TINY.attacks["strong"]},
                               prompt_attack_models=())
    assert runner.run_plan(plan, tmp_path, ENTRY_POINTS, workers=1, quiet=True) == {}  # one spawned worker process
    pooled, here = runner.load_cells(plan, tmp_path), runner.load_cells(plan, runs)  # keys shared with TINY's
    assert pooled.keys() == here.keys() and len(pooled) == 3  # before, after 1 and 2 attack steps
    for key in pooled:
        assert np.array_equal(pooled[key]["images"], here[key]["images"])


def test_runs_are_paired_by_seed_and_an_untrained_model_by_attack_seed():
    from mini_safediff.miniature.report import _paired

    trained = {(t, a): f"m{t}{a}" for t in (0, 1, 2) for a in (0, 1)}
    untrained = {(None, a): f"u{a}" for a in (0, 1)}
    other = {(t, a): f"n{t}{a}" for t in (0, 1, 2) for a in (0, 1)}
    mine, theirs = _paired(trained, other)
    assert [m[1:] for m in mine] == [t[1:] for t in theirs] == ["00", "01", "10", "11", "20", "21"]
    mine, theirs = _paired(trained, untrained)  # each training seed's run of attack seed a meets unseen's run a
    assert [(m[2], t[1]) for m, t in zip(mine, theirs)] == [("0", "0"), ("1", "1")] * 3
    mine, theirs = _paired(untrained, trained)
    assert theirs == [f"m{t}{a}" for t in (0, 1, 2) for a in (0, 1)] and mine == ["u0", "u1"] * 3
    assert _paired(untrained, {(None, a): f"v{a}" for a in (0, 1)}) == (["u0", "u1"], ["v0", "v1"])
