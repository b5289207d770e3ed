"""The tables and figures of a study plan's judged cells (runner.py): rows with 95% intervals pooled over seeds,
recovery statistics with paired differences, the paper's tables in miniature, and PNG figures.

    report = study_report(PLAN, load_cells(PLAN, "runs"))
    report["rows"], report["recovery"]                       # what results.json holds
    write_report(report, PLAN, "results/study")              # results.json, results.md, figures, grids

A row pools every seed run of one model after one attack's step (training seeds x attack seeds; before any attack,
training seeds only). A seed run missing (a training or attack that failed) or broken (non-finite weights, blank
images) makes its row say so instead of a number: a blank image would pass as perfectly safe.
"""
from pathlib import Path

import numpy as np

from ..evaluation.metrics import frechet_distance
from ..io import atomic_write, write_json
from .digits import row_labels
from .statistics import (Estimate, auc_statistic, centred_interval, interval, paired_difference, per_resample,
                         recovery_statistic)
from .study import Plan, expand

FD_RESAMPLES = 200  # an FD is an eigendecomposition: 2,000 per row would take minutes; 200 give a rougher interval
REFERENCES = ("naive", "unseen")  # every model's recovery is compared with these, paired by seed
# The models of the figures and grids: the controls, the paper's method and each baseline's main variant.
KEY_MODELS = ("base", "unseen", "naive", "lt", "ng", "high-official", "esd-u", "sld-max", "immunize")


def _seed_runs(plan: Plan, model: str, attack: str | None) -> list:
    """(training seed, attack seed) of the model's seed runs under an attack (None: before any attack)."""
    train_seeds = plan.train_seeds if plan.models[model].train is not None else (None,)
    attack_seeds = plan.attacks[attack].seeds if attack else (None,)
    return [(t, a) for t in train_seeds for a in attack_seeds]


def _cell_index(plan: Plan, digests) -> dict:
    """(model, training seed, attack, attack seed, step) -> evaluation key (before any attack: attack None)."""
    return {(run.model, run.train_seed, run.attack, run.attack_seed, run.step): run.key
            for run in expand(plan, digests) if run.kind == "evaluate"}


def _curve_cells(plan, index, cells, model, attack, seed_run, steps) -> list | str:
    """The cells of one seed run at these steps (step 0: the model before the attack), or why they are unusable."""
    found = []
    for step in steps:
        key = index.get((model, seed_run[0], None, None, 0) if step == 0 else
                        (model, seed_run[0], attack, seed_run[1], step))
        if key not in cells:
            return "missing (a run failed or was not made)"
        if str(cells[key]["broken"]):
            return f"broken ({cells[key]['broken']})"
        found.append(cells[key])
    return found


def _estimate(value: Estimate) -> dict:
    return {"value": value.value, "ci": [value.low, value.high]}


def cell_row(plan, index, cells, real_features, model, attack, step) -> dict:
    """One row: the metrics of a model after `step` steps of an attack, pooled over its seed runs."""
    runs = [_curve_cells(plan, index, cells, model, attack, seed_run, [step])
            for seed_run in _seed_runs(plan, model, attack if step else None)]
    row = {"model": model, "attack": ("clean fine-tuning" if plan.attacks[attack].rows == "clean" else attack)
           if step else "none", "attack_steps": step, "seeds": len(runs)}
    problem = next((run for run in runs if isinstance(run, str)), None)
    if problem:
        return {**row, "broken": problem}
    cells_ = [run[0] for run in runs]
    metrics = {"harmful_rate": interval([c["harmful_hit"].astype(float) for c in cells_]),
               "harmful_score": interval([c["harmful_prob"] for c in cells_]),
               "clean_accuracy": interval([c["clean_correct"].astype(float) for c in cells_]),
               "fd": centred_interval([c["clean_features"] for c in cells_],
                                      per_resample(lambda f: frechet_distance(f, real_features)),
                                      resamples=FD_RESAMPLES)}
    for name, estimate in metrics.items():
        row[name], row[f"{name}_ci"] = estimate.value, [estimate.low, estimate.high]
    row["n_images"] = sum(len(c["prompted"]) for c in cells_)
    return row


def _hits(found: list) -> np.ndarray:
    return np.stack([cell["harmful_hit"].astype(float) for cell in found], axis=1)  # (images, snapshots)


def recovery_rows(plan, index, cells, base_rate) -> list:
    """Per model and harmful attack: steps to get back to half of base's harmful rate and the area under the
    harmful-rate curve (steps 0 .. last snapshot, as a mean rate), each with its interval, and the paired
    difference of each against naive and against unseen."""
    rows = []
    for attack_name, attack in plan.attacks.items():
        if attack.rows != "harmful":
            continue
        steps = list(attack.snapshots)
        statistics = {"steps_to_half": recovery_statistic(steps, base_rate), "auc": auc_statistic(steps)}
        curves = {}
        for model in plan.models:
            if attack.models is not None and model not in attack.models:
                continue
            seed_runs = _seed_runs(plan, model, attack_name)
            found = [_curve_cells(plan, index, cells, model, attack_name, run, steps) for run in seed_runs]
            problem = next((run for run in found if isinstance(run, str)), None)
            curves[model] = problem or dict(zip(seed_runs, (_hits(run) for run in found)))
        for model, curve in curves.items():
            row = {"model": model, "attack": attack_name, "seeds": len(_seed_runs(plan, model, attack_name))}
            if isinstance(curve, str):
                rows.append({**row, "broken": curve})
                continue
            for name, statistic in statistics.items():
                row[name] = _estimate(interval(list(curve.values()), statistic))
                for reference in REFERENCES:
                    if reference in curves and reference != model and not isinstance(curves[reference], str):
                        mine, theirs = _paired(curve, curves[reference])
                        difference = paired_difference(mine, theirs, statistic)
                        row[f"{name}_vs_{reference}"] = {**_estimate(difference), "resolved": difference.resolved}
            rows.append(row)
    return rows


def _paired(a: dict, b: dict) -> tuple[list, list]:
    """Seed runs of two models lined up by seed pair. An untrained model has one run per attack seed: it pairs
    with every training seed's run of that attack seed."""
    trained = [curve for curve in (a, b) if next(iter(curve))[0] is not None]
    pairs = sorted(trained[0] if trained else a)

    def pick(curve, pair):
        return curve[pair] if pair in curve else curve[None, pair[1]]
    return [pick(a, pair) for pair in pairs], [pick(b, pair) for pair in pairs]


def study_report(plan: Plan, cells: dict, real_features: np.ndarray, digests: dict | None = None) -> dict:
    """Rows (every model x attack x step, pooled over seeds) and recovery rows of a plan's cells."""
    index = _cell_index(plan, digests)
    rows = []
    for model in plan.models:
        rows.append(cell_row(plan, index, cells, real_features, model, None, 0))
        for attack_name, attack in plan.attacks.items():
            if attack.models is None or model in attack.models:
                rows += [cell_row(plan, index, cells, real_features, model, attack_name, step)
                         for step in attack.snapshots if step > 0]
    base = next(row for row in rows if row["model"] == "base" and row["attack_steps"] == 0)
    base_rate = base.get("harmful_rate")
    recovery = recovery_rows(plan, index, cells, base_rate) if base_rate is not None else []
    return {"rows": rows, "recovery": recovery, "base_harmful_rate": base_rate,
            "prompt_attack": prompt_attack_rows(plan, cells, digests)}


def prompt_attack_rows(plan: Plan, cells: dict, digests=None) -> list:
    """UnlearnDiffAtk's attack success rate per model, pooled over its training seeds (a run: its prompts'
    successes), with its interval; and how many successes needed no attack (the prompt itself was flagged)."""
    runs = {}
    for run in expand(plan, digests):
        if run.kind == "prompt-attack":
            runs.setdefault(run.model, []).append(cells.get(run.key))
    rows = []
    for model, results in runs.items():
        row = {"model": model, "attack": "unlearndiffatk", "seeds": len(results)}
        if any(result is None for result in results):
            rows.append({**row, "broken": "missing (a run failed or was not made)"})
            continue
        successes = [np.array([r["success"] for r in result["results"]], float) for result in results]
        estimate = interval(successes)
        rows.append({**row, "asr": estimate.value, "asr_ci": [estimate.low, estimate.high],
                     "prompts": sum(len(s) for s in successes),
                     "unattacked": sum(r["success"] and r["step"] == 0
                                       for result in results for r in result["results"]),
                     "settings": results[0]["settings"]})
    return rows


def _value(row: dict, name: str, digits: int = 2) -> str:
    if row is None:
        return ""
    if row.get("broken"):
        return row["broken"].split(" (")[0]
    low, high = row[f"{name}_ci"]
    return f"{row[name]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _table(header: list, lines: list) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def _find(rows, model, attack, step):
    attack = "none" if step == 0 else attack
    return next((row for row in rows if (row["model"], row["attack"], row["attack_steps"]) == (model, attack, step)),
                None)


def _difference(row: dict, name: str) -> str:
    if name not in row:
        return ""
    low, high = row[name]["ci"]
    return f"{row[name]['value']:+.2f} [{low:+.2f}, {high:+.2f}]" + (" *" if row[name]["resolved"] else "")


def markdown(report: dict, plan: Plan) -> str:
    """The study's tables: one sweep table per attack, the paper's RQ1 and RQ2 tables, clean vs harmful
    fine-tuning, and recovery with paired differences."""
    rows, out = report["rows"], []
    intervals = ("Every value: pooled over seed runs (training seeds x attack seeds), with its 95% interval "
                 "[low, high] from the two-level bootstrap (docs/miniature.md, \"Statistics\").")
    out.append(f"Harmful concept: digit(s) {', '.join(map(str, plan.harmful_digits))}. {intervals}\n")
    harmful_attacks = [name for name, attack in plan.attacks.items() if attack.rows == "harmful"]
    for attack_name in harmful_attacks:
        attack = plan.attacks[attack_name]
        models = [m for m in plan.models if attack.models is None or m in attack.models]
        for metric, title in (("harmful_rate", "harmful rate"), ("clean_accuracy", "clean accuracy")):
            out.append(f"### {title.capitalize()} after the `{attack_name}` attack (`attack.py "
                       f"{' '.join(attack.args)}`), by attack step\n")
            out.append(_table(["model", *map(str, attack.snapshots)],
                              [[m, *(_value(_find(rows, m, attack_name, s), metric) for s in attack.snapshots)]
                               for m in models]))
    after = {name: 100 if 100 in plan.attacks[name].snapshots else max(plan.attacks[name].snapshots)
             for name in harmful_attacks}
    columns = ["harmful rate before", "clean accuracy before", "FD before"] + [
        f"harmful rate after {name} {after[name]}" for name in harmful_attacks]

    def lines(models):
        return [[m, _value(_find(rows, m, None, 0), "harmful_rate"), _value(_find(rows, m, None, 0), "clean_accuracy"),
                 _value(_find(rows, m, None, 0), "fd", 0),
                 *(_value(_find(rows, m, name, after[name]), "harmful_rate") for name in harmful_attacks)]
                for m in models]
    reinforced = [m for m, model in plan.models.items() if model.start != "base"]
    starts = list(dict.fromkeys(plan.models[m].start for m in reinforced))
    out.append("### Safety alignment (the paper's RQ1): each model before and after the attacks\n")
    out.append(_table(["model", *columns], lines([m for m in plan.models if m not in reinforced])))
    if reinforced:
        out.append("### Safety reinforcement (RQ2): LT / NG trained over an already-safe model, then attacked\n")
        out.append(_table(["model", *columns], lines(starts + reinforced)))
    clean_attacks = [name for name, attack in plan.attacks.items() if attack.rows == "clean"]
    for clean in clean_attacks:
        step = max(plan.attacks[clean].snapshots)
        harmful = next((name for name in harmful_attacks if plan.attacks[name].args == plan.attacks[clean].args
                        and step in plan.attacks[name].snapshots), None)
        out.append(f"### Clean vs harmful fine-tuning: {step} steps of `attack.py {' '.join(plan.attacks[clean].args)}`"
                   f" on the clean digits' rows or on the harmful ones ({harmful} attack)\n")
        out.append(_table(["model", "clean accuracy before", f"after clean FT {step}", f"after harmful FT {step}",
                           "FD before", f"after clean FT {step}", f"after harmful FT {step}"],
                          [[m, *(_value(_find(rows, m, a, s), "clean_accuracy")
                                 for a, s in ((None, 0), ("clean fine-tuning", step), (harmful, step))),
                            *(_value(_find(rows, m, a, s), "fd", 0)
                              for a, s in ((None, 0), ("clean fine-tuning", step), (harmful, step)))]
                           for m in plan.models]))
    out.append("### Recovery: steps until the harmful rate is back at half of base's, and the mean harmful rate "
               "over the attack (area under the curve / steps), with paired differences (* : the 95% interval "
               "excludes 0; steps: inf = not back within the last snapshot)\n")
    header = ["model", "attack", "steps to half", "mean rate", *[f"{what} vs {ref}" for ref in REFERENCES
                                                                  for what in ("steps", "mean rate")]]
    recovery_lines = []
    for row in report["recovery"]:
        if row.get("broken"):
            recovery_lines.append([row["model"], row["attack"], row["broken"], "", "", "", "", ""])
            continue
        cells = [row["model"], row["attack"]]
        for name, digits in (("steps_to_half", 0), ("auc", 2)):
            low, high = row[name]["ci"]
            cells.append(f"{row[name]['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        cells += [_difference(row, f"{name}_vs_{ref}") for ref in REFERENCES for name in ("steps_to_half", "auc")]
        recovery_lines.append(cells)
    out.append(_table(header, recovery_lines))
    if report.get("prompt_attack"):
        out.append(f"### UnlearnDiffAtk (`attack.py prompt {' '.join(plan.prompt_attack)}`) before any fine-tuning: "
                   "attack success rate (ASR, share of harmful prompts whose image the judge reads as the harmful "
                   "digit, before or during the attack)\n")
        out.append(_table(["model", "ASR", "prompts", "successes without attack"],
                          [[row["model"], _value(row, "asr"), str(row.get("prompts", "")),
                            str(row.get("unattacked", ""))] for row in report["prompt_attack"]]))
    return "\n".join(out)


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "+")


def plot(report: dict, plan: Plan, folder: Path, models=KEY_MODELS) -> list:
    """recovery.png (harmful rate vs attack steps, a line and its 95% band per model, a panel per harmful attack)
    and clean-accuracy.png (the same for clean accuracy). Needs matplotlib (pip install -e ".[plot]")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [name for name, attack in plan.attacks.items() if attack.rows == "harmful"]
    shown = [m for m in plan.models if m in models] if len(plan.models) > len(models) else list(plan.models)
    written = []
    for metric, label, file in (("harmful_rate", "harmful rate", "recovery.png"),
                                ("clean_accuracy", "clean accuracy", "clean-accuracy.png")):
        figure, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8), squeeze=False,
                                    sharey=True)
        for axis, attack_name in zip(axes[0], attacks):
            snapshots, attacked = plan.attacks[attack_name].snapshots, plan.attacks[attack_name].models
            for color, model in enumerate(shown):  # colour, dashes and marker all differ: equal lines stay visible
                if attacked is not None and model not in attacked:
                    continue
                points = [(step, _find(report["rows"], model, attack_name, step)) for step in snapshots]
                points = [(step, row) for step, row in points if row and not row.get("broken")]
                if not points:
                    continue
                steps = [step for step, _ in points]
                axis.plot(steps, [row[metric] for _, row in points], label=model, color=f"C{color}",
                          linestyle=LINE_STYLES[color % len(LINE_STYLES)], marker=MARKERS[color % len(MARKERS)],
                          markersize=4, markerfacecolor="none")
                axis.fill_between(steps, [row[f"{metric}_ci"][0] for _, row in points],
                                  [row[f"{metric}_ci"][1] for _, row in points], color=f"C{color}", alpha=0.15)
            axis.set_title(f"{attack_name} attack")
            axis.set_xlabel("attack steps")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"{label} (95% interval)")
        handles = {h.get_label(): h for axis in axes[0] for h in axis.get_lines()}  # every model, once
        figure.legend(handles.values(), handles.keys(), fontsize=8, loc="center right")
        figure.tight_layout(rect=(0, 0, 1 - 1.1 / figure.get_figwidth(), 1))
        figure.savefig(folder / file, dpi=110)
        plt.close(figure)
        written.append(folder / file)
    return written


def grids(plan: Plan, cells: dict, folder: Path, digests=None, models=KEY_MODELS, columns: int = 4) -> list:
    """A grid per key model (a row per digit, `columns` images each; first training and attack seed) before the
    attack and after the strong attack's step 100 (or the first harmful attack's last snapshot)."""
    from ..images import save_grid

    index = _cell_index(plan, digests)
    attack_name = "strong" if "strong" in plan.attacks else next(iter(plan.attacks))
    snapshots = plan.attacks[attack_name].snapshots
    step = 100 if 100 in snapshots else max(snapshots)
    written = []
    for model in [m for m in plan.models if m in models]:
        seed = plan.train_seeds[0] if plan.models[model].train is not None else None
        for label, key in (("before", (model, seed, None, None, 0)),
                           (f"{attack_name}-{step}", (model, seed, attack_name, plan.attacks[attack_name].seeds[0],
                                                      step))):
            cell = cells.get(index.get(key))
            if cell is None:
                continue
            picture = np.concatenate([cell["images"][cell["prompted"] == digit][:columns] for digit in range(10)])
            path = folder / f"grid-{model}-{label}.png"
            title = f"{model}, " + ("before any attack" if label == "before" else f"{attack_name} attack, step {step}")
            save_grid(picture, path, cols=columns, model=model, attack=label, rows=row_labels(plan.harmful_digits),
                      title=title + ("" if seed is None else f", training seed {seed}"))
            written.append(path)
    return written


def write_report(report: dict, plan: Plan, cells: dict, folder, digests=None) -> None:
    """results.json (rows and recovery), results.md (the tables), the figures (when matplotlib is installed) and
    the grids, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", report)
    atomic_write(folder / "results.md", lambda tmp: Path(tmp).write_text(markdown(report, plan)))
    try:
        plot(report, plan, folder)
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install -e \".[plot]\")")
    grids(plan, cells, folder, digests)
