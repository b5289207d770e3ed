"""Hostile text and options, and broken models: a model that draws blank images is refused by the prompt attack
(never scored safe) and warned about by sample; text that UTF-8 cannot encode is refused where it enters, naming
the file and line or the option; a caption of megabytes is cut before BPE; every option of `attack.py prompt` is
checked before any work; an option of another method is refused by name."""
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from builders import tiny_pipeline, write_data

import mini_safediff as msd
from mini_safediff import sample
from mini_safediff.models.tokenizer import CLIPTokenizer
from mini_safediff.training.data import SafetyDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attack  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

QUICK_PROMPT_ATTACK = ["prompt", "--iterations", "1", "--timesteps", "1", "--sampling-steps", "2", "--device", "cpu",
                       "--quiet"]


def broken_model(folder: Path, part: str) -> Path:
    """A tiny model with NaN in its UNet or VAE decoder ("unet", "vae"), or with finite weights whose every image
    is one flat colour ("flat": the decoder's output layer zeroed)."""
    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        if part == "unet":
            pipe.unet.conv_out.bias.fill_(float("nan"))
        elif part == "vae":
            pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
        else:
            pipe.vae.decoder.conv_out.weight.zero_()
            pipe.vae.decoder.conv_out.bias.zero_()
    pipe.save(folder)
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Any image generated is work done: the refusals under test must come first."""
    def generate(*args, **kwargs):
        raise AssertionError("an image was generated before the refusal")
    monkeypatch.setattr(msd.Pipeline, "generate", generate)


@pytest.mark.parametrize("which, part", [("model", "unet"), ("model", "vae"), ("target", "unet")])
def test_the_prompt_attack_refuses_a_model_with_non_finite_weights_before_any_work(model, which, part, no_work,
                                                                                  tmp_path):
    broken = broken_model(tmp_path / "nan", part)
    pair = ("--model", f"nan={broken}", "--target-model", str(model)) if which == "model" else (
        "--model", f"ok={model}", "--target-model", str(broken))
    named = "--model nan" if which == "model" else f"--target-model {broken}"
    with pytest.raises(ValueError, match=f"{named}: non-finite weights"):
        attack.main([*QUICK_PROMPT_ATTACK, *pair, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("which", ["model", "target"])
def test_the_prompt_attack_refuses_a_model_whose_every_image_is_flat(model, which, tmp_path):
    flat = broken_model(tmp_path / "flat", "flat")
    pair = ("--model", f"flat={flat}", "--target-model", str(model)) if which == "model" else (
        "--model", f"ok={model}", "--target-model", str(flat))
    named = "--model flat" if which == "model" else f"--target-model {flat}"
    with pytest.raises(ValueError, match=f"{named}: every image is one flat colour"):
        attack.main([*QUICK_PROMPT_ATTACK, *pair, "--out", str(tmp_path / "out")])
    assert not list((tmp_path / "out").glob("*/prompt_attack.json"))


@pytest.mark.parametrize("part, reason", [("vae", "non-finite weights"), ("flat", "every image is one flat colour")])
def test_sample_warns_in_one_line_about_a_broken_model(model, part, reason, tmp_path, capsys):
    broken = broken_model(tmp_path / "broken", part)
    common = ["--prompt", "digit 7", "--n", "1", "--sampling-steps", "2", "--quiet"]
    sample.main(["--model", str(model), *common, "--out", str(tmp_path / "ok")])
    assert capsys.readouterr().err == ""
    sample.main(["--model", str(broken), *common, "--out", str(tmp_path / "out")])
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith(f"warning: {broken}: {reason}")
    assert (tmp_path / "out" / "grid.png").is_file()  # still written: the warning says what they are


def test_a_caption_that_utf8_cannot_encode_is_refused_at_the_row_check(tmp_path):
    folder = write_data(tmp_path / "data", [1, 2])
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = "digit \ud800 two"  # valid JSON: the escape "\ud800" without its pair
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: text cannot be encoded as UTF-8: "
                                         r"character 6 \('\\ud800'\) is a lone surrogate"):
        SafetyDataset(folder, 16)


@pytest.mark.parametrize("argv, option", [
    (["--prompt", "digit \udcff"], "--prompt"),  # an undecodable byte of a command line becomes a lone surrogate
    (["--prompt", "digit 7", "--negative-prompt", "\ud800"], "--negative-prompt"),
    (["--prompt", "digit 7", "--safety-guidance", "medium", "--safety-concept", "\ud800"], "--safety-concept"),
])
def test_text_options_that_utf8_cannot_encode_are_refused_by_name(argv, option, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(argv)
    assert f"argument {option}: must be text that UTF-8 can encode" in capsys.readouterr().err


@pytest.mark.parametrize("parse, argv, option", [
    (train.parse_args, ["--method", "esd-u", "--concept", "nudity \ud800"], "--concept"),
    (evaluate.parse_args, ["--safety-concept", "\ud800"], "--safety-concept"),
])
def test_text_options_of_the_scripts_that_utf8_cannot_encode_are_refused_by_name(parse, argv, option, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert f"argument {option}: must be text that UTF-8 can encode" in capsys.readouterr().err


def test_the_tokenizer_refuses_text_that_utf8_cannot_encode():
    with pytest.raises(ValueError, match=r"cannot tokenize 'digit \\ud800 two': UTF-8 cannot encode it \(character 6"):
        CLIPTokenizer.default()("digit \ud800 two")


@pytest.mark.parametrize("caption, prefix", [
    ("a handwritten digit seven, " * 150_000, "a handwritten digit seven, " * 40),  # 4 MB of words
    ("seven" * 800_000, "seven" * 2000),  # one 4 MB word
    ("digit" + " " * 4_000_000 + "seven", "digit seven"),  # whitespace gives no token, however much of it
])
def test_a_caption_of_megabytes_is_cut_before_bpe_and_keeps_its_first_tokens(caption, prefix):
    tokenizer = CLIPTokenizer.default()
    started = time.perf_counter()
    ids = tokenizer(caption)
    assert time.perf_counter() - started < 1.0  # the whole text: seconds and gigabytes
    assert torch.equal(ids, tokenizer(prefix))


@pytest.mark.parametrize("argv, message", [
    (["--out", "FILE"], "--out .*FILE: is a file, not a folder"),
    (["--tokens", "100"], "argument --tokens: must be a whole number from 1 to 75, got 100"),
    (["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0, got -1"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0, got nan"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got nan"),
    (["--model", "xl=SDXL"], "--model xl: UnlearnDiffAtk is implemented for SD 1 / 2"),
    (["--model", "big=BIG"], "--model big draws 24 px images, --target-model 16 px ones"),
])
def test_the_prompt_attack_checks_its_options_before_any_work(model, sdxl_model, argv, message, no_work, tmp_path,
                                                              capsys):
    (tmp_path / "FILE").write_text("not a folder")
    big = shutil.copytree(model, tmp_path / "big")  # the same weights, drawn at 24 px
    config = json.loads((big / "unet" / "config.json").read_text())
    (big / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 12}))
    argv = [{"FILE": str(tmp_path / "FILE"), "xl=SDXL": f"xl={sdxl_model}", "big=BIG": f"big={big}"}.get(arg, arg)
            for arg in argv]
    with pytest.raises((ValueError, SystemExit)) as refused:
        attack.main([*QUICK_PROMPT_ATTACK, "--target-model", str(model), "--out", str(tmp_path / "out"), *argv])
    said = capsys.readouterr().err if refused.type is SystemExit else str(refused.value)
    assert refused.type is ValueError or refused.value.code == 2
    assert re.search(message, said), said


@pytest.mark.parametrize("parse, argv, message", [
    (sample.parse_args, ["--prompt", "digit 7", "--guidance", "nan"], "--guidance: must be a finite number, got nan"),
    (sample.parse_args, ["--prompt", "digit 7", "--guidance", "inf"], "--guidance: must be a finite number, got inf"),
    (attack.parse_args, ["prompt", "--guidance", "nan"], "--guidance: must be a finite number, got nan"),
    (evaluate.parse_args, ["--guidance", "nan"], "--guidance: must be a finite number, got nan"),
    (evaluate.parse_args, ["--threshold", "nan"], "--threshold: must be a finite number > 0, got nan"),
    (train.parse_args, ["--method", "esd-u", "--negative-guidance", "nan"],
     "--negative-guidance: must be a finite number, got nan"),
    (sample.parse_args, ["--prompt", "digit 7", "--eta", "nan"], "--eta: must be a finite number >= 0, got nan"),
    # the methods' own numbers: NaN would train a NaN model (stopped at its first step, not named)
    (train.parse_args, ["--lambda", "nan"], "--lambda: must be a finite number, got nan"),
    (train.parse_args, ["--harmful-weight", "inf"], "--harmful-weight: must be a finite number, got inf"),
    (train.parse_args, ["--margin", "nan"], "--margin: must be a finite number, got nan"),
    (train.parse_args, ["--method", "immunize", "--attack-weight", "nan"],
     "--attack-weight: must be a finite number, got nan"),
])
def test_numbers_that_are_not_finite_are_refused_by_name(parse, argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert f"argument {message}" in capsys.readouterr().err


@pytest.mark.parametrize("parse, argv", [(train.parse_args, []), (attack.parse_args, []),
                                         (attack.parse_args, ["prompt"])])
def test_weight_decay_nan_is_refused_by_name(parse, argv, capsys):
    with pytest.raises(SystemExit):
        parse([*argv, "--weight-decay", "nan"])
    assert "argument --weight-decay: must be a finite number >= 0, got nan" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--method", "lt", "--immunize-with", "ng", "--inner-steps", "5"],
     "--inner-steps is an option of --method immunize, not of lt"),
    (["--method", "ng", "--immunize-with", "lt"], "--immunize-with is an option of --method immunize, not of ng"),
    (["--method", "esd-u", "--concept", ""], "--method esd-u: --concept \\[''\\] has an empty concept"),
])
def test_an_option_of_another_method_or_an_empty_concept_is_refused_by_name(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
