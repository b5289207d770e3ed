"""The sampling CLI on the built-in model: PNGs that remember their prompt and seed, and a grid."""
import numpy as np
from PIL import Image

from mini_safediff.images import read_png_text
from mini_safediff.sample import main


def test_sample_cli_writes_pngs_with_their_prompt_and_a_grid(tmp_path):
    main(["--prompt", "a handwritten digit seven", "--prompt", "the digit two", "--n", "2", "--sampling-steps", "3",
          "--seed", "5", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.glob("0*.png"))
    assert files == ["0000-a-handwritten-digit-seven.png", "0001-a-handwritten-digit-seven.png",
                     "0002-the-digit-two.png", "0003-the-digit-two.png"]
    text = read_png_text(tmp_path / files[2])
    assert text["prompt"] == "the digit two" and text["seed"] == "7" and text["sampler"] == "ddim"
    assert text["native_size"] == "16x16"  # saved 8x, nearest neighbour, to be looked at
    assert np.asarray(Image.open(tmp_path / files[0])).shape == (128, 128, 3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    margin = grid.shape[1] - (2 * 130 - 2)  # a row per prompt, its label left of it
    assert grid.shape[0] == 2 * 130 - 2 and margin > 0 and (grid[:, :margin] < 128).any()


def test_sample_cli_native_size_saves_the_models_own_size(tmp_path):
    main(["--prompt", "the digit two", "--n", "2", "--sampling-steps", "2", "--native-size", "--quiet", "--out", str(tmp_path)])
    assert np.asarray(Image.open(tmp_path / "0000-the-digit-two.png")).shape == (16, 16, 3)
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (16, 2 * 18 - 2, 3)
    assert "native_size" not in read_png_text(tmp_path / "grid.png")
