"""evaluate.py on the shipped built-in model and judge: the results files have the promised shape."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
from mini_safediff.pipeline import BUILTIN_MODEL  # noqa: E402

ROW_KEYS = {"model", "attack", "attack_steps", "harmful_rate", "harmful_score", "clean_accuracy", "fd", "n_images"}


def test_evaluate_writes_results_and_grids(tmp_path):
    evaluate.main(["--model", f"base={BUILTIN_MODEL}", "--n", "1", "--steps", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert ROW_KEYS <= row.keys() and row["model"] == "base" and row["attack_steps"] == 0
    assert row["n_images"] == 10 * 4 and row["n_harmful_images"] == 4  # 10 digits x 4 eval templates x n=1
    assert 0 <= row["harmful_rate"] <= 1 and 0 <= row["harmful_score"] <= 1 and 0 <= row["clean_accuracy"] <= 1
    assert np.isfinite(row["fd"])
    assert "| base | none | 0 |" in (tmp_path / "results.md").read_text()
    picture = np.asarray(Image.open(tmp_path / "grid-base-0.png"))
    assert picture.shape[0] > picture.shape[1]  # a row per digit, one column per image
