"""Writing files so that a crash never leaves a half-written one: the ground floor every layer may use."""
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
