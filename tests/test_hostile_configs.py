"""Hostile configs and outputs: a config value of the wrong type or out of range is refused naming its file and key
(never a raw traceback from deep inside a model), and train.py never writes over the model it trains from."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import mini_safediff as msd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py

NOT_A_DIVISOR = (r"'norm_num_groups' = 7 is not supported "
                 r"\(supported: a divisor of every block_out_channels entry \[32, 64\]")
BAD_VALUES = [  # (config file, changed keys, what the error names after the file)
    ("unet/config.json", {"block_out_channels": 32}, "'block_out_channels' = 32 must be a list of whole numbers"),
    ("unet/config.json", {"in_channels": "4"}, "'in_channels' = '4' must be a whole number"),
    ("unet/config.json", {"layers_per_block": True}, "'layers_per_block' = True must be a whole number"),
    ("unet/config.json", {"norm_eps": "abc"}, "'norm_eps' = 'abc' must be a finite number"),
    ("unet/config.json", {"norm_eps": float("nan")}, "'norm_eps' = nan must be a finite number"),
    ("unet/config.json", {"norm_eps": 0.0}, "'norm_eps' = 0.0 is out of range"),
    ("unet/config.json", {"norm_num_groups": 7}, NOT_A_DIVISOR),
    ("unet/config.json", {"block_out_channels": []}, "'block_out_channels' = \\[\\] must not be empty"),
    ("vae/config.json", {"norm_num_groups": 7}, NOT_A_DIVISOR),
    ("vae/config.json", {"scaling_factor": "big"}, "'scaling_factor' = 'big' must be a finite number"),
    ("vae/config.json", {"scaling_factor": -0.18}, "'scaling_factor' = -0.18 is out of range"),
    ("text_encoder/config.json", {"layer_norm_eps": -1e-5}, "'layer_norm_eps' = -1e-05 is out of range"),
    ("scheduler/scheduler_config.json", {"beta_end": "x"}, "'beta_end' = 'x' must be a finite number"),
    ("scheduler/scheduler_config.json", {"beta_start": -0.00085}, "'beta_start' = -0.00085 is out of range"),
    ("scheduler/scheduler_config.json", {"beta_end": 1.5}, "'beta_end' = 1.5 is out of range"),
    ("scheduler/scheduler_config.json", {"beta_start": 0.02}, "beta_start = 0.02 is not below beta_end = 0.012"),
    ("text_encoder_2/config.json", {"hidden_size": "big"}, "'hidden_size' = 'big' must be a whole number"),
]


@pytest.mark.parametrize("file, change, message", BAD_VALUES,
                         ids=[f"{file} {json.dumps(change)}" for file, change, _ in BAD_VALUES])
def test_config_values_of_the_wrong_type_or_range_name_file_and_key(tmp_path, model, sdxl_model, file, change,
                                                                    message):
    folder = tmp_path / "model"
    shutil.copytree(sdxl_model if file.startswith("text_encoder_2") else model, folder)
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}"):
        msd.load_pipeline(folder, device="cpu")


def test_a_single_file_whose_metadata_config_is_not_json_is_named(tmp_path, model):
    path = tmp_path / "model.safetensors"
    msd.load_pipeline(model, device="cpu").save(path)
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    save_file(tensors, path, metadata={**metadata, "unet_config": "{not json"})
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: metadata 'unet_config' is not valid JSON"):
        msd.load_pipeline(path, device="cpu")


def esd_args(model, out) -> list:
    return ["--method", "esd-u", "--concept", "a cat", "--steps", "1", "--device", "cpu", "--quiet",
            "--model", str(model), "--out", str(out)]


@pytest.mark.parametrize("source", ["model", "model.safetensors", "model/base"])
def test_train_refuses_an_out_that_would_overwrite_its_model_before_any_work(tmp_path, model, source):
    import train

    out = tmp_path / "runs" / "r"
    if source.endswith(".safetensors"):
        out.mkdir(parents=True)
        msd.load_pipeline(model, device="cpu").save(out / source)
    else:
        shutil.copytree(model, out / source)
    before = sorted(out.rglob("*"))
    with pytest.raises(ValueError, match=f"--out {re.escape(str(out))} would overwrite --model "
                                         f"{re.escape(str(out / source))} \\(train.py writes "
                                         f"{re.escape(str(out / source.split('/')[0]))}\\): choose another --out"):
        train.main(esd_args(out / source, out))
    assert sorted(out.rglob("*")) == before  # nothing written, not even the lock


def test_train_compares_resolved_paths_and_checks_the_unet_too(tmp_path, model, monkeypatch):
    import train

    shutil.copytree(model, tmp_path / "runs" / "r" / "model")
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(ValueError, match="--out ../runs/r would overwrite --model r/model"):
        train.check_args(train.parse_args(esd_args("r/model", "../runs/r")))
    with pytest.raises(ValueError, match="--out r would overwrite --unet r/model.safetensors"):
        train.check_args(train.parse_args([*esd_args(model, "r"), "--unet", "r/model.safetensors"]))
    for elsewhere in ["r/model-old", "r"]:  # a sibling of what it writes, or --out's own folder, is not overwritten
        train.check_args(train.parse_args(esd_args(elsewhere, "r")))


@pytest.mark.parametrize("file, content, message", [
    ("vocab.json", "garbage", "vocab.json or merges.txt is not a BPE vocabulary"),
    ("merges.txt", "#version: 0.2\nabc\n", "vocab.json or merges.txt is not a BPE vocabulary"),
    ("tokenizer.json", "{not json", "tokenizer.json: not a JSON file"),
    ("tokenizer.json", "[1, 2]", "tokenizer.json: a JSON object was expected, not a list"),
    ("tokenizer.json", '{"model": {"type": "WordPiece"}}', "tokenizer.json: no BPE model with a vocab and merges "
                                                          "\\(it holds a WordPiece model\\)"),
    ("tokenizer_config.json", "\xff", "tokenizer_config.json: not a JSON file"),
])
def test_garbage_tokenizer_files_are_named(tmp_path, file, content, message):
    model = tmp_path / "model"
    shutil.copytree(msd.BUILTIN_MODEL, model, ignore=shutil.ignore_patterns("unseen", "*.png", "judge*"))
    (model / "tokenizer" / file).write_text(content, encoding="latin-1")
    with pytest.raises(ValueError, match=re.escape(str(model / "tokenizer")) + ".*" + message):
        msd.load_pipeline(model, device="cpu")
