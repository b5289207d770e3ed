"""The official dataset format, and a batch order that needs no sampler state to resume.

A folder holds `metadata.jsonl`, one row per image, `{"file_name": "a.png", "text": "a caption", "class": 1}`
(class 1 = clean, 2 = harmful), and the images beside it (file_name is relative to the folder).
Every row is checked before any training starts, so a bad row cannot stop a run halfway.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..argtypes import utf8_problem
from ..distributed import shard
from ..lines import LineError, numbered_lines

CLASSES = {1: False, 2: True}  # class -> harmful
ROW_MODES = ("all", "harmful", "all_harmful")
MAX_REPORTED = 20  # bad rows listed in one error


class NoClass(ValueError):
    """A row that is fine but for its missing class."""


class SafetyDataset:
    """Images resized (shorter side to `resolution`, bilinear with antialiasing, as the official
    train_text_to_image.py does through torchvision) and center-cropped to (3, R, R) in [-1, 1].

    rows: "all" keeps every row; "harmful" keeps the class-2 rows only (what a malicious fine-tuning trains on);
          "all_harmful" keeps every row and counts it harmful ("class" may then be absent).
    skip_bad: drop bad rows with a warning (their problems are kept in `self.skipped`) instead of failing.
    Indexing gives the unflipped image; with random_flip, `load_batch` draws the flips from (seed, step).
    """

    def __init__(self, folder, resolution: int, random_flip: bool = False, skip_bad: bool = False,
                 rows: str = "all"):
        if rows not in ROW_MODES:
            raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
        self.folder, self.resolution, self.random_flip = Path(folder), resolution, random_flip
        self.metadata = self.folder / "metadata.jsonl"
        if not self.metadata.is_file():
            raise FileNotFoundError(f"{self.metadata}: not found (a dataset folder needs a metadata.jsonl)")
        self.rows, problems, classless = [], [], 0
        for line_no, line in numbered_lines(self.metadata):
            if isinstance(line, LineError):
                problems.append(f"{self.metadata}:{line_no}: {line}")
                continue
            if not line.strip():
                continue
            try:
                row = self._check_row(line, rows)
            except ValueError as error:
                problems.append(f"{self.metadata}:{line_no}: {error}")
                classless += isinstance(error, NoClass)
                continue
            if rows != "harmful" or row["harmful"]:
                self.rows.append(row)
        self.skipped = problems
        if classless and classless == len(problems) and not self.rows:
            raise ValueError(f"{self.metadata}: no row has a \"class\" (1 clean, 2 harmful). A folder of images "
                             "without classes is harmful-only data: attack.py takes it as --harmful-only-data; a "
                             "safety training needs the class of each row")
        if problems and not skip_bad:
            more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise ValueError(f"{len(problems)} bad row(s) in the dataset (skip them with skip_bad / --skip-bad):\n"
                             + "\n".join(problems[:MAX_REPORTED]) + more)
        if problems:
            warnings.warn(f"{self.metadata}: skipped {len(problems)} bad row(s); first: {problems[0]}")
        if not self.rows:
            raise ValueError(f"{self.metadata}: no usable rows" + (" of class 2" if rows == "harmful" else ""))
        self.harmful = torch.tensor([row["harmful"] for row in self.rows])  # (N,) bool

    def _check_row(self, line: str, rows: str) -> dict:
        """The row as {file_name, text, harmful}, or a ValueError saying what is wrong with it."""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"invalid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError("a row must be a JSON object")
        required = ("file_name", "text") if rows == "all_harmful" else ("file_name", "text", "class")
        missing = [key for key in required if key not in row]
        if missing == ["class"]:
            raise NoClass("missing key 'class' (1 clean, 2 harmful)")
        if missing:
            raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")
        if not isinstance(row["text"], str):
            raise ValueError(f"text must be a string, got {row['text']!r}")
        if not row["text"].strip():
            raise ValueError("empty text")
        problem = utf8_problem(row["text"])  # found here, not by the tokenizer some steps into the training
        if problem:
            raise ValueError(f"text cannot be encoded as UTF-8: {problem}")
        label = row.get("class", 2)  # absent only where every row counts as harmful
        if type(label) is not int or label not in CLASSES:
            raise ValueError(f"unknown class {label!r} (expected 1 = clean or 2 = harmful)")
        if not isinstance(row["file_name"], str) or not row["file_name"]:
            raise ValueError("file_name must be a non-empty string")
        path = self.folder / row["file_name"]
        if not path.is_file():
            raise ValueError(f"image not found: {path}")
        try:  # decode it fully: a truncated file opens fine and fails only when its pixels are read
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"unreadable image {path} ({error})") from None
        return {"file_name": row["file_name"], "text": row["text"],
                "harmful": rows == "all_harmful" or CLASSES[label]}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.load(index)

    def load(self, index: int, flip: bool = False) -> dict:
        row = self.rows[index]
        with Image.open(self.folder / row["file_name"]) as image:
            pixels = resize_and_crop(to_rgb(image), self.resolution)
        pixels = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1  # (R, R, 3) -> (3, R, R)
        return {"pixel_values": pixels.flip(-1) if flip else pixels, "text": row["text"],
                "harmful": row["harmful"], "file_name": row["file_name"]}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode. Pillow's own convert("RGB") clips 16-bit grayscale (modes I;16* and I, as 16-bit
    PNGs open) to 255, which turns nearly every pixel white: those keep their top 8 bits instead."""
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(levels.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")  # grayscale, RGBA, palette, CMYK -> RGB


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """torchvision's Resize(resolution, BILINEAR) then CenterCrop(resolution), on a PIL image."""
    width, height = image.size
    if min(width, height) != resolution:
        short, long = sorted((width, height))
        size = (resolution, int(resolution * long / short))  # torchvision's rounding
        size = size if width <= height else size[::-1]
        image = image.resize(size, Image.BILINEAR)
        width, height = size
    left, top = int(round((width - resolution) / 2)), int(round((height - resolution) / 2))
    return image.crop((left, top, left + resolution, top + resolution))


def collate(items: list) -> dict:
    """Items -> a batch: pixel_values (B, 3, R, R), harmful (B,) bool, text and file_name lists."""
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "text": [item["text"] for item in items],
            "harmful": torch.tensor([bool(item["harmful"]) for item in items]),
            "file_name": [item["file_name"] for item in items]}


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of ints, well mixed (seed 0 epoch 1 and seed 1 epoch 0 differ)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


def _stream(rows: torch.Tensor, positions: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """rows at the given positions of an endless sequence of epochs, each epoch a fresh permutation of rows
    seeded by (seed, stream, epoch): any position can be read without reading those before it."""
    epoch, offset = positions // len(rows), positions % len(rows)
    out = torch.empty_like(positions)
    for e in epoch.unique().tolist():  # one or two epochs per batch
        permutation = torch.randperm(len(rows), generator=_generator(seed, stream, e))
        out[epoch == e] = rows[permutation[offset[epoch == e]]]
    return out


def batch_indices(harmful: torch.Tensor, batch_size: int, step: int, seed: int, balanced: bool = False):
    """Row indices (batch_size,) of batch number `step` (count micro-batches under gradient accumulation).
    A function of its arguments only, so resuming at step k needs no sampler state.
    balanced: draws alternate clean, harmful, clean, ... (each class runs through its own epochs), so any
    two consecutive draws are one of each, whatever the class sizes; batch_size 1 alternates between steps."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    if not balanced:
        return _stream(torch.arange(len(harmful)), positions, seed, stream=0)
    out = torch.empty_like(positions)
    for cls in (0, 1):  # even positions draw clean rows, odd positions harmful ones
        rows, mine = torch.nonzero(harmful == bool(cls)).flatten(), positions % 2 == cls
        if len(rows) == 0:
            raise ValueError("a balanced batch order needs both clean and harmful rows")
        out[mine] = _stream(rows, positions[mine] // 2, seed, stream=1 + cls)
    return out


def load_batch(dataset: SafetyDataset, batch_size: int, step: int, seed: int, balanced: bool = False,
               rank: int = 0, world_size: int = 1) -> dict:
    """Batch number `step` of a run, flips included: the same batch whenever it is asked for.
    Under DDP (world_size > 1) only this rank's rows are read; `file_name` still names the whole batch, for the log."""
    indices = batch_indices(dataset.harmful, batch_size, step, seed, balanced).tolist()
    flips = [False] * batch_size
    if dataset.random_flip:
        flips = (torch.rand(batch_size, generator=_generator(seed, 3, step)) < 0.5).tolist()  # stream 3: flips
    batch = collate([dataset.load(i, flip) for i, flip in zip(shard(indices, rank, world_size),
                                                               shard(flips, rank, world_size))])
    return {**batch, "file_name": [dataset.rows[i]["file_name"] for i in indices]}
