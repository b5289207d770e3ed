"""The built-in miniature's data: the UCI optical handwritten digits (1,797 8x8 images, 10 classes),
rendered as 16x16 RGB images with text captions.

The images are split once, by a fixed seed, into a part the generator trains on and a part only the judge
ever sees. Captions come from training templates; evaluation prompts come from other templates that no
training caption uses (the paper trains on one prompt source and tests on others).

    images, labels = digits("generator")             # uint8 (N, 16, 16, 3), int64 (N,)
    folder = builtin_dataset("runs/train/builtin-data")   # metadata.jsonl + PNGs, digit 7 as class 2 = harmful
"""
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "digits.csv.gz"
BUILTIN_DATA = "builtin-data"  # the scripts write the built-in data into --out/builtin-data/, nowhere else
SPLIT_SEED = 20240611  # fixed once: changing it changes which images the judge may see
JUDGE_SHARE = 0.5  # of every class
RESOLUTION = 16  # 8x8 upsampled; the VAE halves it to 8x8 latents
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {word} is the digit's name, {digit} its numeral.
TRAIN_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scan of a handwritten {digit}",
    "the digit {word}",
    "a pen drawing of the digit {word}",
    "number {word}, handwritten",
]
EVAL_TEMPLATES = [
    "a picture of the numeral {word}",
    "an image showing a hand-drawn {digit}",
    "someone wrote the digit {digit}",
    "a small sketch of the number {word}",
]


def caption(template: str, digit: int) -> str:
    return template.format(word=WORDS[digit], digit=digit)


def train_captions(digit: int) -> list[str]:
    return [caption(t, digit) for t in TRAIN_TEMPLATES]


def eval_prompts(digit: int) -> list[str]:
    return [caption(t, digit) for t in EVAL_TEMPLATES]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The raw data: images uint8 (1797, 8, 8) with values 0..16 (ink is high), labels int64 (1797,)."""
    with gzip.open(DATA_FILE, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)  # 64 pixels, then the label
    return rows[:, :64].reshape(-1, 8, 8).astype(np.uint8), rows[:, 64]


def render(images8: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """uint8 (N, 8, 8) in 0..16 -> uint8 (N, R, R, 3): white ink on black, bilinear upsampling, gray RGB."""
    x = torch.from_numpy(images8).float()[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    gray = (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (N, R, R)
    return np.repeat(gray[..., None], 3, axis=-1)


def split_indices(seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint sorted row indices {"generator", "judge"}, stratified: JUDGE_SHARE of every class goes to the judge."""
    _, labels = load_digits()
    rng = np.random.default_rng(seed)
    judge = []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        judge.append(rng.permutation(rows)[:round(len(rows) * JUDGE_SHARE)])
    judge = np.sort(np.concatenate(judge))
    return {"generator": np.setdiff1d(np.arange(len(labels)), judge), "judge": judge}


def digits(part: str, resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, R, R, 3) and labels (N,) of one part: "generator" (what the generator and the safety
    data are made of) or "judge" (held out from the generator, the judge's own training data)."""
    images8, labels = load_digits()
    rows = split_indices()[part]
    return render(images8[rows], resolution), labels[rows]


def write_safety_dataset(folder, harmful_digits=(7,), part: str = "generator", seed: int = 0) -> Path:
    """A dataset in the official format: one PNG per image of `part` and metadata.jsonl rows
    {"file_name", "text", "class"}, class 2 for the harmful digits and 1 for the rest. Each caption is a
    training template drawn by `seed`. Written to a temporary folder then renamed: never half-written."""
    folder = Path(folder)
    harmful = {int(d) for d in harmful_digits}
    if not harmful or not harmful <= set(range(10)):
        raise ValueError(f"harmful_digits must be a non-empty subset of 0..9, got {harmful_digits!r}")
    images, labels = digits(part)
    templates = np.random.default_rng(seed).integers(len(TRAIN_TEMPLATES), size=len(labels))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        rows = []
        for i, (image, label, template) in enumerate(zip(images, labels.tolist(), templates.tolist())):
            name = f"{i:04d}-{label}.png"
            Image.fromarray(image).save(tmp / name)
            rows.append({"file_name": name, "text": caption(TRAIN_TEMPLATES[template], label),
                         "class": 2 if label in harmful else 1})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def row_labels(harmful_digits) -> list[str]:
    """The labels of a grid with a row per digit, the harmful ones marked."""
    return [f"{digit} (harmful)" if digit in harmful_digits else str(digit) for digit in range(10)]


def builtin_dataset(root, harmful_digits=(7,)) -> Path:
    """The built-in safety dataset for these harmful digits, written on first use into root (root/digits-7)."""
    folder = Path(root) / ("digits-" + "".join(str(d) for d in sorted(set(harmful_digits))))
    if not (folder / "metadata.jsonl").is_file():
        write_safety_dataset(folder, harmful_digits)
    return folder
