"""A run's files: the checkpoint (one plain dict, written atomically), log.jsonl, and starting or resuming."""
import json
import pickle
import warnings
from pathlib import Path

import torch

from ..io import atomic_write, remove_leftovers


def save_checkpoint(checkpoint: dict, path) -> None:
    """One plain dict (tensors, numbers, strings), written atomically: a crash keeps the previous file."""
    atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


CHECKPOINT_KEYS = ("unet", "optimizer", "generator", "step", "args")  # what every script's checkpoint holds


def load_checkpoint(path) -> dict:
    """The checkpoint dict, or a ValueError naming the file when it is empty, truncated, not ours or needs code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint, empty, truncated or not written by this project "
                         f"({reason})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a train.py / attack.py checkpoint (no {', '.join(missing)})")
    return checkpoint


def read_log(path) -> list:
    """log.jsonl's rows. A last line cut short (a crash or a full disk during its append) is dropped with a
    warning: the checkpoint, not the log, holds the run's state. Any other bad line is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: dropped a last line cut short ({e.msg})")
                continue
            raise ValueError(f"{path}:{number}: not a JSON row ({e.msg}); the log is damaged") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: a row without a whole-number \"step\"; the log is damaged")
        rows.append(row)
    return rows


def write_log(path, rows: list, append: bool = False) -> None:
    """log.jsonl, one row a step. Appends are flushed at once, so a crash loses no logged step."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if append:
        with open(path, "a") as f:
            f.write(text)
    else:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


# Options that may differ between a run and its --resume: those that do not change which weights a step computes,
# and --steps, since running on to more steps is what resuming is for (a cosine schedule then stretches).
NOT_DEFINING = {"out", "resume", "allow_changed_settings", "quiet", "device", "checkpoint_every", "preset",
                "save_at", "steps"}


def same_setting(a, b) -> bool:
    """Equal values, or two spellings (relative, absolute) of one existing file or folder."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(a).resolve() == Path(b).resolve()


def changed_settings(saved: dict, now: dict, flags: dict | None = None) -> list[str]:
    """The settings that define the run and differ between the checkpoint's args and this run's, each named by its
    option (flags: argparse dest -> option, where the two differ: lam -> --lambda)."""
    keys = (saved.keys() | now.keys()) - NOT_DEFINING
    flags = flags or {}
    return [f"{flags.get(key, '--' + key.replace('_', '-'))}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in sorted(keys) if not same_setting(saved.get(key), now.get(key))]


def start_or_resume(out: Path, resume: bool, unet, optimizer, generator, main_process: bool = True,
                    settings: dict | None = None, allow_changed: bool = False,
                    flags: dict | None = None) -> tuple[int, dict]:
    """Step 0 with a fresh log; or, with `resume` and a checkpoint in `out`, the checkpoint's step, with the UNet,
    the optimizer and the generator restored and the log cut back to that step. Returns (step, checkpoint),
    the checkpoint for the script's own extra state ({} when starting afresh). Under DDP every rank restores;
    only the main process (rank 0) prints and writes.

    settings: this run's arguments; resuming refuses when those that define the run differ from the checkpoint's
    (unless allow_changed; flags name them as changed_settings does), and a fresh run refuses an `out` that holds an earlier run's checkpoint (a new log
    beside an old checkpoint would mix two runs)."""
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if main_process:
        for leftover in remove_leftovers(out):
            print(f"removed {leftover}, left by an interrupted write")
    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        changed = changed_settings(checkpoint["args"], settings, flags) if settings is not None else []
        if changed and not allow_changed:
            raise ValueError(f"{checkpoint_path} was written with other settings; resume with the same ones (or "
                             "pass --allow-changed-settings):\n  " + "\n  ".join(changed))
        unet.load_state_dict(checkpoint["unet"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        if main_process:
            write_log(log_path, [row for row in read_log(log_path) if row["step"] <= checkpoint["step"]])
            print(f"resumed from {checkpoint_path} at step {checkpoint['step']}"
                  + (" with changed settings:\n  " + "\n  ".join(changed) if changed else ""))
        return checkpoint["step"], checkpoint
    if checkpoint_path.exists():
        raise ValueError(f"--out {out} holds an earlier run ({checkpoint_path.name}): continue it with --resume, "
                         "or choose another --out (or delete it)")
    if main_process:
        if resume:
            print(f"--resume: no {checkpoint_path} yet, starting from step 0")
        out.mkdir(parents=True, exist_ok=True)
        write_log(log_path, [])
    return 0, {}
