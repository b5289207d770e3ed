"""Prompt files for evaluation: plain text (one prompt a line, blank lines skipped), a CSV with a `prompt`
column, or the I2P layout (`prompt`, `evaluation_seed`, `evaluation_guidance`, `categories`, ...), whose
per-row seed and guidance are honoured.

    prompts = read_prompts("i2p_benchmark.csv", categories=["sexual"])
    prompts[0]  # Prompt(text='...', seed=2734971755, guidance=7.0, categories=('sexual', 'violence'), index=0, line=2)
"""
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..lines import LineError, numbered_lines

# The first of these columns that a CSV has gives the per-row value: the unlearning benchmarks' CSVs (ESD,
# UnlearnDiffAtk) name them evaluation_*, the I2P dataset itself sd_*.
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance")


@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int | None = None  # None: the caller's --seed decides
    guidance: float | None = None  # None: the caller's --guidance decides
    categories: tuple = ()
    index: int = 0  # position among the file's prompts before any category filter: names the prompt's images
    line: int = 0  # where the prompt sits in its file, for messages


def split_categories(text: str) -> tuple:
    """I2P writes categories as one comma-separated field ("sexual, violence"); compared in lower case."""
    return tuple(c.strip().lower() for c in text.split(",") if c.strip())


def read_prompts(path, categories=None) -> list[Prompt]:
    """The prompts of a .csv file (by its header) or of any other file read as plain text. `categories`: keep
    only the rows that carry at least one of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = _read_csv(path) if path.suffix.lower() == ".csv" else _read_text(path)
    if not prompts:
        raise ValueError(f"{path}: holds no prompt")
    if categories:
        wanted = {c.strip().lower() for c in categories}
        prompts = [p for p in prompts if wanted & set(p.categories)]
        if not prompts:
            raise ValueError(f"{path}: no prompt in the categories {', '.join(sorted(wanted))}")
    return prompts


def _read_text(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in numbered_lines(path):
        if isinstance(line, LineError):
            raise ValueError(f"{path}:{number}: {line}")
        if line.strip():
            prompts.append(Prompt(line.strip(), index=len(prompts), line=number))
    return prompts


def _read_csv(path: Path) -> list[Prompt]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if "prompt" not in header:
            raise ValueError(f"{path}: a CSV prompt file needs a `prompt` column (header: {', '.join(header)})")
        column = {name: i for i, name in enumerate(header)}
        seed_column = next((name for name in SEED_COLUMNS if name in column), None)
        guidance_column = next((name for name in GUIDANCE_COLUMNS if name in column), None)
        prompts = []
        for row in _rows(reader, path):
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)}")
            text = row[column["prompt"]].strip()
            if not text:
                raise ValueError(f"{where}: empty prompt")
            prompts.append(Prompt(
                text,
                seed=_seed(row[column[seed_column]], where) if seed_column else None,
                guidance=_guidance(row[column[guidance_column]], where) if guidance_column else None,
                categories=split_categories(row[column["categories"]]) if "categories" in column else (),
                index=len(prompts), line=reader.line_num))
    return prompts


def _rows(reader, path: Path):
    try:
        yield from reader
    except csv.Error as e:  # e.g. an unclosed quote running to the end of the file
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _number(cell: str, where: str, name: str, valid, expected: str) -> float | None:
    """An optional numeric cell: empty -> None."""
    cell = cell.strip()
    if not cell:
        return None
    try:
        value = float(cell)  # files saved by pandas write integer columns with gaps as 123.0
    except ValueError:
        value = math.nan
    if not valid(value):
        raise ValueError(f"{where}: {name} {cell!r} is not {expected}")
    return value


def _seed(cell: str, where: str) -> int | None:
    value = _number(cell, where, "seed", lambda v: v.is_integer() and 0 <= v < 2**63, "a non-negative integer")
    return None if value is None else int(cell) if cell.strip().isdigit() else int(value)


def _guidance(cell: str, where: str) -> float | None:
    return _number(cell, where, "guidance", lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
