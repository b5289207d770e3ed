"""The command-line convention of train.py, attack.py, evaluate.py and sample: repeatable named models, --help
with every default, presets, the training --dtype and small images saved scaled up."""
import argparse
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_safediff import cli, sample
from mini_safediff.images import read_png_text, save_grid, save_png
from mini_safediff.miniature.settings import MINIATURE_ATTACK, MINIATURE_TRAIN, SAMPLING_GUIDANCE, SAMPLING_STEPS
from mini_safediff.models.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attack  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

PARSERS = {"train.py": train.make_parser, "attack.py finetune": attack.make_finetune_parser,
           "evaluate.py": evaluate.make_parser, "attack.py prompt": attack.make_prompt_parser,
           "sample": sample.make_parser}


@pytest.mark.parametrize("parse", [attack.parse_args, evaluate.parse_args, lambda argv: attack.parse_args(["prompt", *argv])],
                         ids=["attack finetune", "evaluate", "attack prompt"])
def test_repeated_model_options_keep_every_model(parse):
    args = parse(["--model", "base=weights", "--model", "lt=runs/lt/model"])
    assert cli.model_pairs(args.model) == [("base", "weights"), ("lt", "runs/lt/model")]


@pytest.mark.parametrize("path, name", [("runs/lt/model", "lt"), ("runs/lt/model/", "lt"), ("x/sd14", "sd14"),
                                        ("w.safetensors", "w"), ("runs/lt/model.safetensors", "lt"),
                                        ("sd-v1-5.ckpt", "sd-v1-5")])
def test_a_bare_path_names_itself(path, name):
    assert cli.model_pairs([path]) == [(name, path)]


@pytest.mark.parametrize("options, message", [
    (["a=x", "b=y", "a=z"], "--model a=z: the name 'a' is given twice"),
    (["runs/lt/model", "lt=other"], "--model lt=other: the name 'lt' is given twice"),
    (["../x=weights"], "--model ../x=weights: '../x' is not a plain name"),
    ([".hidden=weights"], "--model .hidden=weights: '.hidden' is not a plain name"),
    (["=weights"], "--model =weights: '' is not a plain name"),
])
def test_repeated_and_unplain_names_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cli.model_pairs(options)


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_shows_every_default_and_every_option_has_help(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default
    parser = PARSERS[script]()
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:  # help; an old name
            continue
        option = action.option_strings[0]
        assert action.help, f"{script} {option}: no help text"
        if action.required:
            continue
        if action.default is None or action.default == "":
            assert "default" in action.help, f"{script} {option}: say in words what happens by default"
        elif action.default is not False:
            assert f"(default: {action.default})" in text, f"{script} {option}: default not shown"
    assert "default: None" not in text
    assert parser.description.strip() in parser.format_help()  # the docstring as written


def test_preset_miniature_sets_the_calibrated_values_and_explicit_options_win():
    args = train.parse_args(["--preset", "miniature"])
    assert {dest: getattr(args, dest) for dest in MINIATURE_TRAIN} == MINIATURE_TRAIN
    assert (args.steps, args.lr, args.batch_size, args.balanced, args.method, args.lam, args.harmful_weight) == (
        200, 3e-5, 8, True, "lt", 3e-3, -0.5)
    args = train.parse_args(["--lr", "1e-4", "--preset", "miniature", "--no-balanced", "--method", "ng"])
    assert (args.lr, args.balanced, args.method, args.lam) == (1e-4, False, "ng", 3e-3)
    paper = train.parse_args([])
    assert (paper.preset, paper.lr, paper.lam, paper.batch_size, paper.steps, paper.harmful_weight) == (
        "paper", 1e-5, 5e-5, 1, 200, 0.0)
    args = attack.parse_args(["--preset", "miniature", "--steps", "7"])
    assert (args.lr, args.batch_size, args.steps) == (MINIATURE_ATTACK["lr"], MINIATURE_ATTACK["batch_size"], 7)
    assert (attack.parse_args([]).lr, attack.parse_args([]).steps) == (1e-5, 20)


def test_paper_preset_on_the_built_in_model_says_it_changes_nothing_visible(tmp_path, capsys):
    args = train.parse_args(["--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    train.train(args)
    out = capsys.readouterr().out
    assert "--preset paper" in out and "--preset miniature" in out


def test_attack_names_the_built_in_base_model_it_attacks_by_default(tmp_path, capsys):
    attack.finetune(attack.parse_args(["--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path)]))
    assert "attacking the built-in base model; pass --model runs/train/model" in capsys.readouterr().out
    assert (tmp_path / "base" / "step-1" / "model" / "model_index.json").is_file()


@pytest.mark.parametrize("script", [train, attack], ids=["train", "attack"])
def test_training_refuses_float16_by_name(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--dtype", "float16"])
    assert "float16 is refused in training" in capsys.readouterr().err
    assert script.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"


def test_one_default_of_sampling_steps_and_the_miniatures_own():
    assert inspect.signature(Pipeline.generate).parameters["steps"].default == DEFAULT_STEPS == 50
    assert sample.parse_args(["--prompt", "a cat"]).sampling_steps == DEFAULT_STEPS
    real = evaluate.parse_args(["--judge", "nudenet"])
    assert (real.sampling_steps, real.guidance) == (DEFAULT_STEPS, DEFAULT_GUIDANCE) == (50, 7.5)
    miniature = evaluate.parse_args([])
    assert (miniature.sampling_steps, miniature.guidance) == (SAMPLING_STEPS, SAMPLING_GUIDANCE) == (20, 5.0)
    assert evaluate.parse_args(["--sampling-steps", "3", "--guidance", "0"]).guidance == 0


def test_small_images_are_saved_scaled_up_unless_native_size(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    save_png(image, tmp_path / "big.png", prompt="seven")
    big = np.asarray(Image.open(tmp_path / "big.png"))
    assert big.shape == (128, 128, 3) and np.array_equal(big[::8, ::8], image)  # nearest neighbour, 8x
    assert read_png_text(tmp_path / "big.png") == {"prompt": "seven", "native_size": "16x16"}
    save_png(image, tmp_path / "native.png", scale_up=False, prompt="seven")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "native.png")), image)
    assert read_png_text(tmp_path / "native.png") == {"prompt": "seven"}
    save_png(np.zeros((20, 200, 3), np.uint8), tmp_path / "wide.png")
    assert np.asarray(Image.open(tmp_path / "wide.png")).shape == (140, 1400, 3)  # short side 20 -> 7x
    save_png(np.zeros((128, 64 * 3, 3), np.uint8), tmp_path / "large.png")
    assert np.asarray(Image.open(tmp_path / "large.png")).shape == (128, 192, 3)

    images = np.stack([image] * 4)
    save_grid(images, tmp_path / "grid.png", cols=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 130 - 2, 2 * 130 - 2, 3) and np.array_equal(grid[:128, :128], big)  # 2-pixel gaps
    assert read_png_text(tmp_path / "grid.png")["native_size"] == "16x16"
    save_grid(images, tmp_path / "grid-native.png", cols=2, scale_up=False)
    assert np.asarray(Image.open(tmp_path / "grid-native.png")).shape == (34, 34, 3)


def test_labelled_grids_name_their_rows_and_title():
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8) + 200
    from mini_safediff.images import labelled
    bare = np.asarray(Image.fromarray(images[0]))
    picture = labelled(np.concatenate([np.concatenate([bare, bare], 1)] * 2), rows=["7 (harmful)", "2"], title="lt")
    assert picture.shape[0] > 32 and picture.shape[1] > 32
    assert (picture[:, :picture.shape[1] - 32] < 100).any()  # the labels are drawn left of the images
    assert np.array_equal(picture[-32:, -32:], np.concatenate([np.concatenate([bare, bare], 1)] * 2))
