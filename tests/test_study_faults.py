"""The study runner under faults: a killed study leaves no worker behind, a stop request ends it at once, a cell
does not depend on the thread count it was made with, and a damaged cached output is named and made again."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_study_runner import ENTRY_POINTS, TINY, tiny_study  # noqa: F401 (the fixture)

from mini_safediff.miniature import runner
from mini_safediff.training.guard import StopRequest

ROOT = Path(__file__).resolve().parent.parent
SMALL = dataclasses.replace(TINY, models={"base": TINY.models["base"]}, attacks={"strong": TINY.attacks["strong"]},
                            prompt_attack_models=())  # one evaluation before, an attack of 2 steps, 2 after


def children(pid: int) -> list[int]:
    """The live processes whose parent is pid (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_killed_study_leaves_no_worker_and_a_rerun_equals_an_uninterrupted_one(tiny_study, tmp_path):
    script = ("import sys; from test_study_faults import SMALL, ENTRY_POINTS; from mini_safediff.miniature import "
              f"runner; runner.run_plan(SMALL, {str(tmp_path)!r}, ENTRY_POINTS, workers=1, quiet=True)")
    study = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT / "tests",
                             env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    attack_folder = tmp_path / "study" / "attack"
    deadline = time.time() + 120
    while not (attack_folder.is_dir() and any(attack_folder.iterdir())) and time.time() < deadline:
        assert study.poll() is None, "the study ended before its attack started"
        time.sleep(0.05)
    workers = [pid for pid in children(study.pid) if "spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_text()]
    assert workers, "no worker process found"
    study.kill()
    study.wait()
    deadline = time.time() + 5
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived the study it belonged to"
    assert runner.run_plan(SMALL, tmp_path, ENTRY_POINTS, workers=1, quiet=True) == {}
    again, uninterrupted = runner.load_cells(SMALL, tmp_path), runner.load_cells(SMALL, tiny_study[0])
    assert again.keys() == uninterrupted.keys() and len(again) == 3
    for key in again:
        assert np.array_equal(again[key]["images"], uninterrupted[key]["images"])


@pytest.mark.parametrize("ending", ["stops at a checkpoint", "finishes its last step"])
def test_a_stop_request_ends_the_study_after_the_run_in_progress(tmp_path, ending):
    calls = []

    def interrupted_attack(argv):
        calls.append(argv)
        with StopRequest():  # as train.py's and attack.py's loops: the first Ctrl-C only asks them to stop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here
            if ending == "stops at a checkpoint":
                sys.exit("stopped at step 1: saved checkpoint.pt; continue with --resume")

    plan = dataclasses.replace(SMALL, attacks={"strong": TINY.attacks["strong"], "clean": TINY.attacks["clean"]})
    with pytest.raises(KeyboardInterrupt, match=r"study stopped with \d+ of 6 runs made; the same command continues"):
        runner.run_plan(plan, tmp_path, {"train": None, "attack": interrupted_attack}, workers=0, quiet=True)
    assert len(calls) == 1  # nothing after the interrupted run, and it is not counted as failed
    marked = (tmp_path / "study" / "attack").glob("*/done.json")
    assert len(list(marked)) == (ending == "finishes its last step")


def record_threads(argv):
    """An attack entry point that notes the thread count it runs with, then fails."""
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.txt").write_text(str(torch.get_num_threads()))
    sys.exit("recorded")


@pytest.mark.parametrize("workers", [0, 1])
def test_every_run_computes_on_one_thread_however_it_is_run(tmp_path, workers):
    """Two threads sum a convolution in another order: a cell made by a worker would then differ from one made
    in-process by a grey level here and there, and the cache would depend on how it was filled."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        failed = runner.run_plan(SMALL, tmp_path, {"train": None, "attack": record_threads}, workers=workers,
                                 quiet=True)
        assert torch.get_num_threads() == 2  # this process's own setting is given back
    finally:
        torch.set_num_threads(before)
    assert any("recorded" in why for why in failed.values())
    (recorded,) = (tmp_path / "study" / "attack").glob("*/threads.txt")
    assert recorded.read_text() == str(runner.RUN_THREADS) == "1"


def _damage_cell(path: Path, how: str):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a cell\n")
    else:  # a readable archive without the arrays of a cell
        with open(path, "wb") as file:
            np.savez(file, images=np.zeros((2, 16, 16, 3), np.uint8))


def test_a_damaged_cached_output_is_named_and_made_again(tiny_study, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_study[0], runs)
    made = runner.load_cells(TINY, runs)
    cell_run = next(run for run in runner.expand(TINY) if run.kind == "evaluate" and run.step)
    cell = runner.output_path(runner.study_root(runs), cell_run)
    for how in ("truncated", "empty", "text", "wrong arrays"):
        _damage_cell(cell, how)
        assert not runner.is_done(runner.study_root(runs), cell_run)
        assert runner.run_plan(TINY, runs, ENTRY_POINTS, workers=0, quiet=True) == {}
        assert f"{cell}: " in capsys.readouterr().out, how
        assert np.array_equal(runner.load_cells(TINY, runs)[cell_run.key]["images"], made[cell_run.key]["images"])
    prompt_run = next(run for run in runner.expand(TINY) if run.kind == "prompt-attack")
    result = runner.output_path(runner.study_root(runs), prompt_run) / runner.ATTACKED / "prompt_attack.json"
    for damage in (lambda: result.write_text(result.read_text()[:40]), result.unlink):
        damage()
        assert runner.run_plan(TINY, runs, ENTRY_POINTS, workers=0, quiet=True) == {}
        assert "prompt_attack.json is missing or damaged" in capsys.readouterr().out
        assert json.loads(result.read_text())["results"] == made[prompt_run.key]["results"]
