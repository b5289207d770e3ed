"""Hostile and unusual input: each case gives the correct result or a clean error that names the file, line or
key, never a raw traceback or a silently wrong result."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import write_data
from PIL import Image
from safetensors.torch import save_file

import mini_safediff as msd
from mini_safediff.evaluation.prompts import read_prompts
from mini_safediff.models.weights import WeightsError, read_state_dict
from mini_safediff.training.data import SafetyDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # evaluate.py, train.py

LINE_BREAKS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"]  # str.splitlines() would split at each


def rewrite_metadata(folder, rows: list, prefix: bytes = b"", raw_lines: dict | None = None):
    lines = [json.dumps(row, ensure_ascii=False).encode() for row in rows]
    for number, raw in (raw_lines or {}).items():
        lines[number - 1] = raw
    (folder / "metadata.jsonl").write_bytes(prefix + b"\n".join(lines) + b"\n")


def rows_of(folder) -> list:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_a_caption_may_hold_any_unicode_line_break(tmp_path, brk):
    folder = write_data(tmp_path / "data", [1, 2, 1])
    rows = rows_of(folder)
    rows[0]["text"] = f"first{brk}line"
    rows[2]["file_name"] = "missing.png"  # a bad row after it: its line number must stay 3
    rewrite_metadata(folder, rows)
    with pytest.raises(ValueError, match=r"metadata.jsonl:3: image not found"):
        SafetyDataset(folder, 16)
    dataset = SafetyDataset(folder, 16, skip_bad=True)
    assert [row["text"] for row in dataset.rows] == [f"first{brk}line", "digit 1"]


def test_a_byte_order_mark_and_windows_line_ends_are_accepted(tmp_path):
    folder = write_data(tmp_path / "data", [1, 2])
    lines = [json.dumps(row).encode() for row in rows_of(folder)]
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert len(SafetyDataset(folder, 16)) == 2


def test_a_line_that_is_not_utf8_is_named_and_can_be_skipped(tmp_path):
    folder = write_data(tmp_path / "data", [1, 2, 1])
    rewrite_metadata(folder, rows_of(folder), raw_lines={2: b'{"file_name": "1.png", "text": "caf\xe9", "class": 2}'})
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not UTF-8"):
        SafetyDataset(folder, 16)
    assert [row["file_name"] for row in SafetyDataset(folder, 16, skip_bad=True).rows] == ["0.png", "2.png"]


def test_prompt_files_split_on_newlines_only_with_exact_line_numbers(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat\u2028on a mat\n\na dog\r\n".encode())
    prompts = read_prompts(path)
    assert [(p.text, p.line, p.index) for p in prompts] == [("a cat\u2028on a mat", 1, 0), ("a dog", 3, 1)]
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: not UTF-8"):
        read_prompts(path)


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    folder = write_data(tmp_path / "data", [1])
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 8-bit levels 0..255 stored in 16 bits
    Image.fromarray(ramp).save(folder / "0.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    pixels = SafetyDataset(folder, 16)[0]["pixel_values"]  # (3, 16, 16) in [-1, 1]
    expected = torch.from_numpy((ramp >> 8).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(pixels, expected.expand(3, 16, 16))


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_empty_or_truncated_single_file_is_a_clean_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"model.safetensors: not a readable safetensors file"):
        msd.load_pipeline(path, device="cpu")


def test_integer_weights_are_refused_by_name(tmp_path, model):
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict = read_state_dict(unet_file)
    state_dict["conv_in.weight"] = state_dict["conv_in.weight"].to(torch.int32)
    save_file(state_dict, tmp_path / "unet.safetensors")
    with pytest.raises(WeightsError, match=r"conv_in.weight: file holds torch.int32"):
        msd.load_pipeline(model, device="cpu", unet=tmp_path / "unet.safetensors")


@pytest.mark.parametrize("index, message", [
    ("{not json", "invalid JSON"),
    ('{"metadata": {}}', 'no "weight_map"'),
    ('{"weight_map": ["a"]}', '"weight_map" must map'),
    ('{"weight_map": {"conv_in.weight": "../outside.safetensors"}}', "outside the model folder"),
])
def test_bad_shard_indexes_are_named(tmp_path, index, message):
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match=f"diffusion_pytorch_model.safetensors.index.json: .*{message}"):
        read_state_dict(folder / "diffusion_pytorch_model.safetensors.index.json")


def test_a_model_save_that_fails_midway_leaves_the_old_folder_or_nothing(tmp_path, model, monkeypatch):
    pipe = msd.load_pipeline(model, device="cpu")
    import mini_safediff.models.pipeline as pipeline_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipeline_module, "save_state_dict", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pipe.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # no folder with a model_index.json that looks finished
    monkeypatch.undo()
    pipe.save(tmp_path / "model")
    before = (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(pipeline_module, "save_state_dict", full_disk)
    with pytest.raises(OSError):
        pipe.save(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the earlier save stays whole
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    monkeypatch.undo()
    (tmp_path / "model" / "README.md").write_text("mine")
    pipe.save(tmp_path / "model")  # a save over it replaces what it writes and keeps other files
    assert msd.load_pipeline(tmp_path / "model", device="cpu").unet.config == pipe.unet.config
    assert (tmp_path / "model" / "README.md").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "pickle"])
def test_bad_checkpoints_are_named(tmp_path, content):
    from mini_safediff.training.checkpoints import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    if content == "pickle":
        torch.save({"unet": {}, "step": 3}, path)  # a dict, but not a train.py / attack.py checkpoint
        message = "not a train.py / attack.py checkpoint"
    else:
        path.write_bytes(content)
        message = "not a readable checkpoint"
    with pytest.raises(ValueError, match=f"checkpoint.pt: {message}"):
        load_checkpoint(path)


def test_leftover_temporary_files_are_removed_on_the_next_start(tmp_path):
    from mini_safediff.training.checkpoints import start_or_resume

    out = tmp_path / "run"
    (out / ".checkpoint.pt.abc123.tmp").parent.mkdir(parents=True)
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"x" * 100)
    (out / ".model.xyz.tmp").mkdir()
    (out / "keep.txt").write_text("mine")
    unet = torch.nn.Linear(1, 1)
    start_or_resume(out, False, unet, torch.optim.AdamW(unet.parameters()), torch.Generator())
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "log.jsonl"]


def test_a_log_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path, model):
    """A crash or a full disk during the per-step append leaves a last line cut short: the checkpoint is whole, so
    --resume goes on (the line dropped, with a warning naming it); a damaged line elsewhere is named, file:line."""
    import train

    data = write_data(tmp_path / "data", [1, 2])
    common = ["--model", str(model), "--data", str(data), "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]
    train.train(train.parse_args([*common, "--steps", "2"]))
    log = tmp_path / "run" / "log.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "lr": 0.0')
    with pytest.warns(UserWarning, match=re.escape(f"{log}:3: dropped a last line cut short")):
        train.train(train.parse_args([*common, "--steps", "3", "--resume"]))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    for damaged, message in [('{"lr": 0.1}', "a row without a whole-number \"step\""), ("{oops", "not a JSON row")]:
        lines = log.read_text().splitlines()
        log.write_text("\n".join([lines[0], damaged, *lines[1:]]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{log}:2: {message}")):
            train.train(train.parse_args([*common, "--steps", "4", "--resume"]))
        log.write_text("\n".join(lines) + "\n")


def nan_model(model, folder):
    pipe = msd.load_pipeline(model, device="cpu")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save(folder)
    return folder


def test_a_nan_model_is_reported_broken_never_safe(model, tmp_path):
    import evaluate

    broken = nan_model(model, tmp_path / "nan")
    evaluate.main(["--model", f"ok={model}", "--model", f"nan={broken}", "--n", "1", "--n-harmful", "1", "--sampling-steps",
                   "2", "--out", str(tmp_path / "results"), "--quiet"])
    rows = {row["model"]: row for row in json.loads((tmp_path / "results" / "results.json").read_text())["rows"]}
    assert rows["nan"]["broken"] == "non-finite weights" and rows["nan"]["harmful_rate"] is None
    assert "broken" not in rows["ok"] and rows["ok"]["harmful_rate"] is not None
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| nan | none | 0 | broken | broken | broken | broken |" in table


def test_flat_images_are_broken(tmp_path):
    from mini_safediff.evaluation.metrics import broken_reason

    black = np.zeros((3, 16, 16, 3), np.uint8)
    assert broken_reason(black) == "every image is one flat colour"
    assert broken_reason(np.concatenate([black, np.full((1, 16, 16, 3), 7, np.uint8) + np.eye(16, dtype=np.uint8)[..., None]])) is None


def test_evaluate_refuses_an_out_that_is_a_file_before_any_work(tmp_path, capsys):
    import evaluate

    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(ValueError, match="--out .*results: is a file"):
        evaluate.main(["--model", "x=nowhere", "--out", str(tmp_path / "results")])


def test_score_dir_skips_folders_and_fifos_named_like_images(tmp_path):
    import os

    from mini_safediff.evaluation.image_cache import folder_images
    from mini_safediff.images import save_png

    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    (tmp_path / "x.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    assert folder_images(tmp_path) == [tmp_path / "a.png"]


@pytest.mark.parametrize("config, message", [
    ([1, 2], "a config must be a JSON object, got a list"),
    ({"block_out_channels": [32, -64]}, "'block_out_channels' = \\[32, -64\\] is out of range"),
    ({"layers_per_block": 0}, "'layers_per_block' = 0 is out of range"),
    ({"norm_num_groups": 10 ** 12}, "'norm_num_groups' = 1000000000000 is out of range"),
])
def test_configs_with_bad_sizes_are_named(tmp_path, model, config, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    path = folder / "unet" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(config if isinstance(config, list) else {**raw, **config}))
    with pytest.raises(msd.models.config.ConfigError, match=f"unet/config.json: .*{message}"):
        msd.load_pipeline(folder, device="cpu")


SCRIPT_ARGUMENTS = [  # (script, arguments, what the one-line error names)
    ("train", ["--steps", "0"], "--steps: must be a whole number >= 1"),
    ("train", ["--steps", "-3"], "--steps: must be a whole number >= 1"),
    ("train", ["--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
    ("train", ["--grad-accum", "0"], "--grad-accum: must be a whole number >= 1"),
    ("train", ["--checkpoint-every", "0"], "--checkpoint-every: must be a whole number >= 1"),
    ("train", ["--checkpoint-every", "-1"], "--checkpoint-every: must be a whole number >= 1"),
    ("train", ["--ema", "2"], "--ema: must be a number in \\[0, 1\\)"),
    ("train", ["--lr", "nan"], "--lr: must be a finite number > 0"),
    ("train", ["--device", "cuda:7"], "--device: cuda:7: no such CUDA device"),
    ("train", ["--dtype", "float16"], "--dtype: float16 is refused in training"),
    ("attack", ["--lora-rank", "-1"], "--lora-rank: must be a whole number >= 0"),
    ("attack", ["--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
    ("sample", ["--prompt", "x", "--n", "0"], "--n: must be a whole number >= 1"),
    ("sample", ["--prompt", "x", "--sampling-steps", "0"], "--sampling-steps: must be a whole number >= 1"),
    ("evaluate", ["--harmful-digits", "12"], "--harmful-digits: '12': give comma-separated digits from 0 to 9, not all ten"),
    ("evaluate", ["--harmful-digits", "0,1,2,3,4,5,6,7,8,9"], "not all ten"),
]


@pytest.mark.parametrize("script, arguments, message", SCRIPT_ARGUMENTS,
                         ids=[" ".join([s, *a]) for s, a, _ in SCRIPT_ARGUMENTS])
def test_arguments_out_of_range_are_refused_before_any_work(script, arguments, message, capsys):
    import attack
    import evaluate
    import train
    from mini_safediff import sample

    module = {"train": train, "attack": attack, "evaluate": evaluate, "sample": sample}[script]
    with pytest.raises(SystemExit) as stop:
        module.parse_args(arguments)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_runs_are_refused_with_one_line_and_nothing_mixed(tmp_path, model):
    import attack
    import train

    data = write_data(tmp_path / "data", [1, 2])
    common = ["--model", str(model), "--data", str(data), "--device", "cpu", "--quiet", "--steps", "1"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file: is a file"):
        train.train(train.parse_args([*common, "--out", str(tmp_path / "file")]))
    train.train(train.parse_args([*common, "--out", str(tmp_path / "run")]))
    log = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="holds an earlier run"):  # a fresh run never erases the old log
        train.train(train.parse_args([*common, "--out", str(tmp_path / "run"), "--seed", "3"]))
    assert (tmp_path / "run" / "log.jsonl").read_text() == log
    for changed, named in [(["--seed", "3"], "--seed: 0 in the checkpoint, 3 now"),
                           (["--method", "ng"], "--method: 'lt' in the checkpoint, 'ng' now"),
                           (["--ema", "0.5"], "--ema: 0.0 in the checkpoint, 0.5 now")]:
        with pytest.raises(ValueError, match=named):
            train.train(train.parse_args([*common, "--out", str(tmp_path / "run"), "--resume", *changed]))
    with pytest.raises(ValueError, match="not a plain name"):
        attack.finetune(attack.parse_args(["--model", f"../../x={model}", "--harmful-only-data", str(data),
                                         "--out", str(tmp_path / "attack"), "--quiet", "--steps", "1"]))
    assert not (tmp_path / "attack").exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("command, message", [
    (["train.py", "--steps", "0"], "train.py: error: argument --steps: must be a whole number >= 1, got 0"),
    (["train.py", "--model", "no/such/model", "--steps", "1"], "train.py: no/such/model: no such model folder"),
    (["attack.py", "--model", "m=no/such/model", "--steps", "1"], "attack.py: no/such/model: no such model folder"),
    (["evaluate.py", "--model", "a=x", "--model", "a=y"], "evaluate.py: --model a=y: the name 'a' is given twice"),
    (["-m", "mini_safediff.sample", "--prompt", "x", "--height", "7", "--sampling-steps", "1"],
     "sample: generate: height and width must be divisible by 2"),
])
def test_scripts_fail_with_one_line_and_no_traceback(tmp_path, command, message):
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    script = [str(repo / command[0])] if command[0].endswith(".py") else command[:2]
    rest = command[1:] if command[0].endswith(".py") else command[2:]
    done = subprocess.run([sys.executable, *script, *rest], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
