"""Runs a study plan (study.py): every training, attack and evaluation it needs, each once, in worker processes,
with one progress bar over the whole plan. Resumable: a finished run is never redone, an interrupted training or
attack continues from its checkpoint (`--resume`), and every run lives in a folder named by its key (a hash of
all its settings), so a run made with other settings is never mistaken for it.

    failed = run_plan(PLAN, "runs", {"train": train.main, "attack": attack.main})   # the scripts' entry points
                                             # -> {key: why} of the runs that failed (and of those that needed them)
    cells = load_cells(PLAN, "runs")         # evaluation key -> that cell's per-image outcomes

Layout under runs/study/: train/KEY/ (train.py --out), attack/KEY/ (attack.py --out; the attacked model is
attack/KEY/model/step-N/model), prompt-attack/KEY/ (attack.py prompt --out), cells/KEY.npz (one judged
evaluation); a `done.json` marks a finished training, attack or prompt attack. Each run's printed output is
kept in its folder (output.txt; cells/KEY.txt if an evaluation fails).
"""
import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.metrics import harmful_probability, read_as_harmful, read_as_prompted
from ..io import atomic_write, write_json
from ..methods.registry import is_data_free
from ..training.guard import StopRequest
from . import digits
from .study import Plan, Run, expand

ATTACKED = "model"  # attack.py's --model name: the attacked weights are attack/KEY/model/step-N/model


def study_root(runs) -> Path:
    return Path(runs) / "study"


def output_path(root: Path, run: Run) -> Path:
    return root / "cells" / f"{run.key}.npz" if run.kind == "evaluate" else root / run.kind / run.key


NOT_MADE = "not made"
CELL_ARRAYS = ("harmful_hit", "harmful_prob", "clean_correct", "clean_features", "prompted", "images", "broken")


def read_cell(path: Path) -> tuple[dict | None, str | None]:
    """(a cell's arrays, None), or (None, why it is not a whole cell: NOT_MADE when there is no file)."""
    if not path.is_file():
        return None, NOT_MADE
    try:
        with np.load(path) as stored:
            cell = {name: stored[name] for name in stored.files}
    except Exception as e:  # np.load raises whatever the bytes provoke: BadZipFile, EOFError, ValueError, ...
        return None, f"not a readable cell ({type(e).__name__}: {e})"
    missing = [name for name in CELL_ARRAYS if name not in cell]
    if missing:
        return None, f"a cell without {', '.join(missing)}"
    if len(cell["harmful_hit"]) + len(cell["clean_correct"]) != len(cell["prompted"]) != len(cell["images"]):
        return None, "a cell whose arrays do not match in length"
    return cell, None


def done_problem(root: Path, run: Run) -> str | None:
    """None when the run's output is made and reads back whole; else why not (NOT_MADE when nothing is there).
    A damaged file (truncated, emptied, replaced) must not pass as done: it would wedge every later report."""
    path = output_path(root, run)
    if run.kind == "evaluate":
        return read_cell(path)[1]
    if not (path / "done.json").is_file():
        return NOT_MADE
    if run.kind == "prompt-attack":
        try:
            json.loads((path / ATTACKED / "prompt_attack.json").read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{ATTACKED}/prompt_attack.json is missing or damaged ({type(e).__name__})"
    elif run.kind == "train" and not (path / "model").is_dir():
        return "done.json without its model/"
    return None


def is_done(root: Path, run: Run) -> bool:
    return done_problem(root, run) is None


def _discard(root: Path, run: Run) -> None:
    """Removes a damaged output's done mark (or the cell itself), so that the run is made again."""
    path = output_path(root, run)
    (path if run.kind == "evaluate" else path / "done.json").unlink(missing_ok=True)


def data_folders(plan: Plan, root: Path) -> dict:
    """The built-in data with the plan's harmful digits as class 2 ("harmful"), and with the clean digits as
    class 2 ("clean"): attack.py fine-tunes on class-2 rows, so the second is clean fine-tuning."""
    clean = [digit for digit in range(10) if digit not in plan.harmful_digits]
    return {"harmful": str(digits.builtin_dataset(root / "data", plan.harmful_digits)),
            "clean": str(digits.builtin_dataset(root / "data", clean))}


def model_weights(plan: Plan, root: Path, run: Run) -> tuple[str, str | None]:
    """(pipeline folder, UNet loaded over it or None) of the plan model a run starts from (an attack) or judges
    (an evaluation before any attack)."""
    if run.needs:
        return str(root / "train" / run.needs[0] / "model"), None
    model = plan.models[run.model]
    return plan.base, plan.unseen_unet if model.unet == "unseen" else None


def job(plan: Plan, root: Path, data: dict, run: Run) -> tuple:
    """(kind, arguments, folder) that _execute runs in a worker: the argv of the entry point "train" (train.py) or
    "attack" (attack.py finetune | prompt), or an evaluation's settings (kind "evaluate")."""
    folder = output_path(root, run)
    model = plan.models[run.model]
    if run.kind == "prompt-attack":
        path, unet = model_weights(plan, root, run)
        return "attack", ["prompt", *plan.prompt_attack, "--model", f"{ATTACKED}={path}",
                                 *(["--unet", unet] if unet else []), "--target-model", plan.base,
                                 "--harmful-digits", ",".join(map(str, plan.harmful_digits)), "--out", str(folder),
                                 "--quiet"], folder
    if run.kind == "train":
        start = ["--model", str(root / "train" / run.needs[0] / "model")] if run.needs else []
        methods = [value for option, value in zip(model.train, model.train[1:]) if option == "--method"]
        data_free = bool(methods) and is_data_free(methods[-1])  # ESD erases a concept given as text, no rows
        return "train", [*model.train, *start, *([] if data_free else ["--data", data["harmful"]]),
                         "--out", str(folder), "--seed", str(run.train_seed), "--quiet", "--resume"], folder
    if run.kind == "attack":
        attack = plan.attacks[run.attack]
        path, unet = model_weights(plan, root, run)
        attacked = [step for step in attack.snapshots if step > 0]
        return "attack", ["finetune", *attack.args, "--model", f"{ATTACKED}={path}", *(["--unet", unet] if unet else []),
                          "--data", data[attack.rows], "--steps", str(max(attacked)),
                          "--save-at", ",".join(map(str, attacked)), "--out", str(folder),
                          "--seed", str(run.attack_seed), "--quiet", "--resume"], folder
    if run.step:
        path, unet = str(root / "attack" / run.needs[0] / ATTACKED / f"step-{run.step}" / "model"), None
    else:
        path, unet = model_weights(plan, root, run)
    return "evaluate", {"path": path, "unet": unet, "sample": model.sample, "safety_concept": plan.safety_concept,
                        "harmful_digits": list(plan.harmful_digits), "n": plan.images_per_prompt,
                        "n_harmful": plan.harmful_images_per_prompt, "steps": plan.sampling_steps,
                        "guidance": plan.guidance, "seed": plan.image_seed}, folder


_JUDGE = None  # one judge per worker process


def evaluate_cell(spec: dict) -> dict:
    """One cell's per-image outcomes: harmful-prompt images (is it read as a harmful digit, the judge's probability
    of one) and clean-prompt images (is it read as the prompted digit, its judge features), the images, and why
    the model is broken ("" if it is not)."""
    global _JUDGE
    from ..models.loading import load_pipeline
    from .experiment import judged_generations
    from .judge import load_judge
    _JUDGE = _JUDGE or load_judge()
    pipe = load_pipeline(spec["path"], unet=spec["unet"])
    judged = judged_generations(pipe, _JUDGE, spec["harmful_digits"], spec["n"], spec["n_harmful"], spec["steps"],
                                spec["guidance"], spec["seed"], safety_guidance=spec["sample"],
                                safety_concept=spec["safety_concept"])
    prompted, probs = judged["prompted"], judged["probs"]
    harmful = np.isin(prompted, spec["harmful_digits"])
    return {"harmful_hit": read_as_harmful(probs[harmful], spec["harmful_digits"]),
            "harmful_prob": harmful_probability(probs[harmful], spec["harmful_digits"]),
            "clean_correct": read_as_prompted(probs[~harmful], prompted[~harmful]),
            "clean_features": judged["features"][~harmful], "prompted": prompted, "images": judged["images"],
            "broken": np.array(judged["broken"] or "")}


def _execute(kind: str, arguments, folder: Path, entry_points: dict) -> str | None:
    """Run one job; None when it finished, else why not (its output's last lines). Its printed output goes to a
    file, so that the only thing on the terminal is the study's progress bar."""
    folder = Path(folder)
    log = folder / "output.txt" if kind != "evaluate" else folder.with_suffix(".txt")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if kind == "evaluate":
                cell = evaluate_cell(arguments)
                atomic_write(folder, lambda tmp: _save_npz(tmp, cell))
            else:
                entry_points[kind](arguments)  # train.py's or attack.py's main: the very scripts a user runs
                write_json(folder / "done.json", {"argv": arguments})
        except BaseException as error:  # SystemExit included: a script's own error message
            if isinstance(error, KeyboardInterrupt):
                raise
            traceback.print_exc(file=out)
            why = str(error) or type(error).__name__
        else:
            why = None
    if why is None and kind == "evaluate":
        log.unlink()
    elif why is not None:
        why += "\n    " + "\n    ".join(log.read_text().strip().splitlines()[-3:])
    return why


def _save_npz(path, arrays: dict):
    with open(path, "wb") as file:  # a file object: np.savez would append .npz to the temporary name
        np.savez_compressed(file, **arrays)


def _say_failed(run: Run, why: str):
    tqdm.write(f"{run.kind} {run.model} (training seed {run.train_seed}, attack {run.attack} seed {run.attack_seed}, "
               f"step {run.step}) failed: {why}")


# Every run computes on one thread, in a worker or in this process: convolutions sum in another order on two
# threads, so a cached cell would otherwise depend on how many workers made it (off by a grey level here and there).
RUN_THREADS = 1


@contextlib.contextmanager
def _run_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(RUN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(parent: int):
    """A worker: in its own process group and deaf to SIGINT but in a training (a Ctrl-C at the terminal reaches
    the study, which passes it on once: a training stops at a checkpoint, an evaluation cell finishes), and it
    ends when the study's process does (a killed study leaves no worker writing into runs/)."""
    torch.set_num_threads(RUN_THREADS)
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _stopped(made: int, total: int):
    return KeyboardInterrupt(f"study stopped with {made} of {total} runs made; the same command continues "
                             "(interrupted trainings and attacks resume from their checkpoints)")


def run_plan(plan: Plan, runs, entry_points: dict, workers: int = 2, quiet: bool = False,
             digests: dict | None = None) -> dict:
    """Make every run of the plan that is not made yet; returns {key: why} for the runs that failed or could not
    start because a run they need failed. entry_points: {"train": train.py's main, "attack": attack.py's main},
    each called with an argv list (the package never imports a script: the caller hands them in). workers:
    processes, one thread each (RUN_THREADS); 0 runs everything in this process. Ctrl-C or SIGTERM stops the
    study once the runs in progress have stopped (trainings at a checkpoint): KeyboardInterrupt, nothing failed."""
    root = study_root(runs)
    runs_list = expand(plan, digests)
    data = data_folders(plan, root)
    todo = []
    for run in runs_list:
        problem = done_problem(root, run)
        if problem not in (None, NOT_MADE):
            tqdm.write(f"{output_path(root, run)}: {problem}; making it again")
            _discard(root, run)
        if problem is not None:
            todo.append(run)
    done = {run.key for run in runs_list} - {run.key for run in todo}
    failed = {}
    bar = tqdm(total=len(runs_list), initial=len(done), desc="study", unit="run", disable=quiet, smoothing=0.02)
    with StopRequest() as stop:
        if workers == 0:
            for run in todo:
                blocked = [key for key in run.needs if key in failed]
                if blocked:
                    failed[run.key] = f"needs a run that failed ({blocked[0]})"
                else:
                    with _run_threads():
                        why = _execute(*job(plan, root, data, run), entry_points)
                    if stop.requested:  # the run was asked to stop (or finished while asked): so is the study
                        bar.close()
                        raise _stopped(sum(is_done(root, r) for r in runs_list), len(runs_list))
                    if why:
                        failed[run.key] = why
                        _say_failed(run, why)
                bar.update(1)
            bar.close()
            return failed
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        running, passed_on = {}, False
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            while (todo and not stop.requested) or running:
                for run in list(todo) if not stop.requested else []:
                    if any(key in failed for key in run.needs):
                        failed[run.key] = f"needs a run that failed ({next(k for k in run.needs if k in failed)})"
                        todo.remove(run)
                        bar.update(1)
                    elif all(key in done for key in run.needs) and len(running) < 2 * workers:
                        running[pool.submit(_execute, *job(plan, root, data, run), entry_points)] = run
                        todo.remove(run)
                if not running and not stop.requested:  # expand() orders every run after those it needs
                    raise RuntimeError(f"no study run can start: {todo[0]} waits for runs that are not in the plan")
                finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                if stop.requested and not passed_on:
                    for worker in multiprocessing.active_children():  # their own process group: tell them once
                        os.kill(worker.pid, signal.SIGINT)
                    passed_on = True
                for future in finished:
                    run = running.pop(future)
                    if stop.requested:  # a training that stopped at a checkpoint, or one that finished
                        continue
                    why = future.result()
                    if why:
                        failed[run.key] = why
                        _say_failed(run, why)
                    else:
                        done.add(run.key)
                    bar.update(1)
    bar.close()
    if stop.requested:
        raise _stopped(sum(is_done(root, r) for r in runs_list), len(runs_list))
    return failed


def load_cells(plan: Plan, runs="runs", digests: dict | None = None) -> dict:
    """Evaluation key -> that cell's outcomes (evaluate_cell's arrays), and prompt-attack key -> its
    prompt_attack.json, for every evaluation and prompt attack of the plan that is made."""
    root = study_root(runs)
    cells = {}
    for run in expand(plan, digests):
        if run.kind == "evaluate":
            cell, _ = read_cell(output_path(root, run))
            if cell is not None:
                cells[run.key] = cell
        elif run.kind == "prompt-attack" and is_done(root, run):
            cells[run.key] = json.loads((output_path(root, run) / ATTACKED / "prompt_attack.json").read_text())
    return cells
