"""The metadata.jsonl dataset (data.py): row checks, image preprocessing, resumable batch order."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mini_safediff.training.data import SafetyDataset, batch_indices, collate, load_batch


def write_image(path, size=(8, 6), mode="RGB", seed=0):
    """A random image of (width, height) = size, saved in the given PIL mode."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    (image if mode == "RGBA" else image.convert("RGB")).convert(mode).save(path)


def write_folder(folder, rows):
    """rows: dicts (written as JSON) or raw strings (written as they are), one per line."""
    folder.mkdir(exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def good_rows(folder, n=4, harmful_every=2):
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        write_image(folder / f"{i}.png", seed=i)
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", "class": 2 if i % harmful_every else 1})
    return rows


def test_items_shape_range_and_image_modes(tmp_path):
    write_image(tmp_path / "rgb.png", (12, 8), "RGB")
    write_image(tmp_path / "gray.png", (8, 8), "L")
    write_image(tmp_path / "rgba.png", (6, 10), "RGBA")
    write_image(tmp_path / "palette.png", (7, 7), "P")
    names = ["rgb.png", "gray.png", "rgba.png", "palette.png"]
    write_folder(tmp_path, [{"file_name": n, "text": n, "class": 1 + i % 2} for i, n in enumerate(names)])
    dataset = SafetyDataset(tmp_path, 4)
    assert len(dataset) == 4 and dataset.harmful.tolist() == [False, True, False, True]
    for i, name in enumerate(names):
        item = dataset[i]
        assert item["pixel_values"].shape == (3, 4, 4) and item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert item["text"] == name and item["file_name"] == name and item["harmful"] == bool(i % 2)
    gray = dataset[1]["pixel_values"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("size, crop", [((16, 8), (2, 0, 6, 4)),  # wide: 16x8 -> 8x4, centre columns 2..5
                                        ((8, 17), (0, 2, 4, 6))])  # tall: 8x17 -> 4x8 (int(17/2)), rows 2..5
def test_resize_shorter_side_bilinear_then_center_crop(tmp_path, size, crop):
    write_image(tmp_path / "a.png", size)
    write_folder(tmp_path, [{"file_name": "a.png", "text": "a", "class": 1}])
    with Image.open(tmp_path / "a.png") as image:
        resized = image.convert("RGB").resize((size[0] // 2, int(size[1] / 2)), Image.BILINEAR)
    expected = torch.from_numpy(np.array(resized.crop(crop))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(SafetyDataset(tmp_path, 4)[0]["pixel_values"], expected)


def test_image_at_resolution_is_unchanged_and_flip_mirrors(tmp_path):
    write_image(tmp_path / "a.png", (4, 4))
    write_folder(tmp_path, [{"file_name": "a.png", "text": "a", "class": 1}])
    dataset = SafetyDataset(tmp_path, 4)
    with Image.open(tmp_path / "a.png") as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(((dataset[0]["pixel_values"] + 1) * 127.5).round(), pixels.float())
    assert torch.equal(dataset.load(0, flip=True)["pixel_values"], dataset[0]["pixel_values"].flip(-1))


def truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


BAD_ROWS = {
    "invalid JSON": ('{"file_name": "0.png", "text": ', "invalid JSON"),
    "not an object": ('["0.png", "caption", 1]', "a row must be a JSON object"),
    "missing keys": ({"file_name": "0.png"}, "missing key(s) 'text', 'class'"),
    "unknown class": ({"file_name": "0.png", "text": "x", "class": 3}, "unknown class 3"),
    "class as string": ({"file_name": "0.png", "text": "x", "class": "2"}, "unknown class '2'"),
    "class as list": ({"file_name": "0.png", "text": "x", "class": [2]}, "unknown class [2]"),
    "text not a string": ({"file_name": "0.png", "text": 7, "class": 1}, "text must be a string, got 7"),
    "empty text": ({"file_name": "0.png", "text": "  ", "class": 1}, "empty text"),
    "missing image": ({"file_name": "gone.png", "text": "x", "class": 1}, "image not found"),
    "corrupt image": ({"file_name": "junk.png", "text": "x", "class": 1}, "unreadable image"),
    "truncated image": ({"file_name": "half.png", "text": "x", "class": 1}, "unreadable image"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_names_file_line_and_problem(tmp_path, case):
    bad, problem = BAD_ROWS[case]
    rows = good_rows(tmp_path, 2)
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    truncated_png(tmp_path / "half.png")
    write_folder(tmp_path, [rows[0], "", bad, rows[1]])  # line 2 is blank (allowed), the bad row is line 3
    with pytest.raises(ValueError) as error:
        SafetyDataset(tmp_path, 4)
    assert f"{tmp_path / 'metadata.jsonl'}:3: {problem}" in str(error.value)


def test_all_bad_rows_reported_at_once_or_skipped_with_a_count(tmp_path):
    rows = good_rows(tmp_path, 4)
    write_folder(tmp_path, rows[:2] + ["oops", {"file_name": "gone.png", "text": "x", "class": 1}] + rows[2:])
    with pytest.raises(ValueError, match="2 bad row") as error:
        SafetyDataset(tmp_path, 4)
    assert "metadata.jsonl:3: invalid JSON" in str(error.value)
    assert "metadata.jsonl:4: image not found" in str(error.value)
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        dataset = SafetyDataset(tmp_path, 4, skip_bad=True)
    assert len(dataset) == 4 and len(dataset.skipped) == 2
    assert [dataset[i]["file_name"] for i in range(4)] == ["0.png", "1.png", "2.png", "3.png"]


def test_row_selection_harmful_only_or_all_harmful(tmp_path):
    rows = good_rows(tmp_path, 6)  # classes 1, 2, 1, 2, 1, 2
    write_folder(tmp_path, rows)
    harmful = SafetyDataset(tmp_path, 4, rows="harmful")
    assert [harmful[i]["file_name"] for i in range(3)] == ["1.png", "3.png", "5.png"] and harmful.harmful.all()
    rows[0].pop("class")  # a plain image-caption folder is fine when every row counts as harmful
    write_folder(tmp_path, rows)
    everything = SafetyDataset(tmp_path, 4, rows="all_harmful")
    assert len(everything) == 6 and everything.harmful.all()
    with pytest.raises(ValueError, match="missing key"):
        SafetyDataset(tmp_path, 4)
    with pytest.raises(ValueError, match="rows must be"):
        SafetyDataset(tmp_path, 4, rows="clean")


def test_batch_order_is_deterministic_resumable_and_covers_each_epoch():
    harmful = torch.tensor([False] * 7 + [True] * 3)  # 10 rows
    order = torch.cat([batch_indices(harmful, 5, step, seed=0) for step in range(6)])  # 3 epochs
    for epoch in order.view(3, 10):
        assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:20])  # a fresh permutation each epoch
    # a resumed run asks for step 4 with no history: the same rows
    assert torch.equal(batch_indices(harmful, 5, 4, seed=0), order[20:25])
    # batches that straddle an epoch boundary (10 rows, batch 3) read the same stream
    assert torch.equal(torch.cat([batch_indices(harmful, 3, step, seed=0) for step in range(10)]), order[:30])
    assert not torch.equal(torch.cat([batch_indices(harmful, 5, s, seed=1) for s in range(6)]), order)


def test_balanced_order_draws_classes_equally():
    harmful = torch.tensor([False] * 8 + [True] * 2)
    for step in range(10):
        rows = batch_indices(harmful, 4, step, seed=3, balanced=True)
        assert harmful[rows].tolist() == [False, True, False, True]
    singles = torch.cat([batch_indices(harmful, 1, step, seed=3, balanced=True) for step in range(40)])
    assert harmful[singles].tolist() == [False, True] * 20  # batch size 1: classes alternate between steps
    counts = torch.bincount(singles, minlength=10).tolist()  # clean: 2 epochs of 8 and 4 draws of a third
    assert sorted(counts[:8]) == [2, 2, 2, 2, 3, 3, 3, 3] and counts[8:] == [10, 10]
    with pytest.raises(ValueError, match="both clean and harmful"):
        batch_indices(torch.zeros(4, dtype=torch.bool), 2, 0, seed=0, balanced=True)


def test_load_batch_collates_and_flips_reproducibly(tmp_path):
    write_folder(tmp_path, good_rows(tmp_path, 4))
    plain, flipping = SafetyDataset(tmp_path, 4), SafetyDataset(tmp_path, 4, random_flip=True)
    batch = load_batch(plain, 3, step=1, seed=0)
    indices = batch_indices(plain.harmful, 3, 1, seed=0).tolist()
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["harmful"].dtype == torch.bool
    assert batch["file_name"] == [f"{i}.png" for i in indices]
    assert batch["text"] == [f"caption {i}" for i in indices]
    assert torch.equal(batch["harmful"], plain.harmful[indices])
    assert torch.equal(batch["pixel_values"], collate([plain[i] for i in indices])["pixel_values"])
    flipped = 0
    for step in range(4):
        a, b = load_batch(flipping, 3, step, seed=0), load_batch(flipping, 3, step, seed=0)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        for image, name in zip(a["pixel_values"], a["file_name"]):
            unflipped = plain[int(name[0])]["pixel_values"]
            assert torch.equal(image, unflipped) or torch.equal(image, unflipped.flip(-1))
            flipped += not torch.equal(image, unflipped)
    assert 0 < flipped < 12
