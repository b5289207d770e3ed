"""Writing files so that a crash never leaves a half-written one, and output folders that one process owns at a
time: the ground floor every layer may use."""
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path, marker: str):
    """Yields a fresh hidden sibling folder to write a whole folder into; on success its entries replace those of
    the same name in `path`, `marker` (e.g. model_index.json) last and after the old marker was removed first.
    Files of other names in `path` are kept. A crash or full disk while writing leaves `path` as it was; a crash
    while moving leaves it without `marker`, which says "unfinished"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        (path / marker).unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda entry: entry.name == marker):
            target = path / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(folder) -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (hidden `.NAME.*.tmp` files and folders, which can be
    checkpoint-sized); returns them."""
    leftovers = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for leftover in leftovers:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return leftovers


def write_json(path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


@contextmanager
def owned_folder(folder, what: str, enabled: bool = True):
    """Makes this process the only writer of `folder` while the block runs: a lock (folder/.lock, holding the
    owner's pid and what it runs) that a second process is refused with, naming the owner. The kernel drops the
    lock when its process dies, so a lock left by a killed run is free. On leaving, the lock file goes, and so
    does the folder if this claim made it and nothing was written into it. enabled False (the other processes
    of a torchrun): nothing."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file, not a folder")
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "another process"
            file.close()
            raise ValueError(f"{folder} is in use by {owner}: wait until it ends, or choose another --out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
            break  # the lock is on the file the path names, not on one that its last owner just removed
        file.close()
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} ({what})\n")
    file.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        file.close()
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
