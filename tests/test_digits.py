"""The built-in digits data: a fixed split, captions, and the official dataset format."""
import json

import numpy as np
import pytest
import torch

from mini_safediff.miniature import digits
from mini_safediff.training.data import SafetyDataset


def test_split_is_fixed_disjoint_and_stratified():
    first, second = digits.split_indices(), digits.split_indices()
    for part in ("generator", "judge"):
        np.testing.assert_array_equal(first[part], second[part])
    generator, judge = first["generator"], first["judge"]
    assert len(np.intersect1d(generator, judge)) == 0
    assert len(generator) + len(judge) == 1797
    _, labels = digits.load_digits()
    assert np.abs(np.bincount(labels[judge]) - np.bincount(labels[generator])).max() <= 1  # half of every class
    assert not np.array_equal(digits.split_indices(seed=1)["judge"], judge)


def test_rendered_images():
    images, labels = digits.digits("judge")
    assert images.shape == (898, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (898,)
    assert (images[..., 0] == images[..., 2]).all()  # gray
    assert images.max() > 200 and (images < 10).mean() > 0.3  # white ink on a black background


def test_eval_prompts_are_never_training_captions():
    train = {c for d in range(10) for c in digits.train_captions(d)}
    evaluation = {p for d in range(10) for p in digits.eval_prompts(d)}
    assert len(train) == 10 * len(digits.TRAIN_TEMPLATES) and len(evaluation) == 10 * len(digits.EVAL_TEMPLATES)
    assert not train & evaluation
    assert not any(t in e for t in train for e in evaluation)  # not even as part of a prompt


def test_safety_dataset_is_read_by_safety_dataset(tmp_path):
    folder = digits.write_safety_dataset(tmp_path / "data", harmful_digits=(3, 7))
    dataset = SafetyDataset(folder, resolution=16)
    images, labels = digits.digits("generator")
    assert len(dataset) == len(labels)
    np.testing.assert_array_equal(dataset.harmful.numpy(), np.isin(labels, (3, 7)))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert {row["class"] for row in rows} == {1, 2}
    for i in (0, 5, 100):
        item = dataset[i]
        assert item["text"] in digits.train_captions(int(labels[i]))
        expected = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 127.5 - 1  # PNGs are lossless
        torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=0)
    assert len({row["text"] for row in rows}) > 50  # every training template is used


def test_safety_dataset_is_deterministic_and_reused(tmp_path):
    a = digits.write_safety_dataset(tmp_path / "a")
    b = digits.write_safety_dataset(tmp_path / "b")
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    name = json.loads((a / "metadata.jsonl").read_text().splitlines()[7])["file_name"]
    assert (a / name).read_bytes() == (b / name).read_bytes()
    folder = digits.builtin_dataset(root=tmp_path)
    assert folder == tmp_path / "digits-7"
    written = (folder / "metadata.jsonl").stat().st_mtime_ns
    assert digits.builtin_dataset(root=tmp_path) == folder
    assert (folder / "metadata.jsonl").stat().st_mtime_ns == written  # reused, not rewritten
    with pytest.raises(ValueError, match="harmful_digits"):
        digits.write_safety_dataset(tmp_path / "bad", harmful_digits=(10,))
