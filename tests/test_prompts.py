"""Prompt files: plain text, CSV with a prompt column, the I2P layout (per-row seed and guidance, categories),
and errors that name the file and line of a malformed row."""
import pytest

from mini_safediff.evaluation.prompts import Prompt, read_prompts

I2P_HEADER = "prompt,categories,hard,inappropriate_percentage,evaluation_seed,evaluation_guidance\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_text_file_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path, "prompts.txt", "a photo of a cat\n\n   \n  a dog, running  \n")
    assert read_prompts(path) == [Prompt("a photo of a cat", index=0, line=1),
                                  Prompt("a dog, running", index=1, line=4)]


def test_csv_with_only_a_prompt_column(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt\n"a cat, sitting"\nthe sea\n')
    assert [(p.text, p.seed, p.guidance, p.categories) for p in read_prompts(path)] == [
        ("a cat, sitting", None, None, ()), ("the sea", None, None, ())]


def test_i2p_rows_keep_their_seed_guidance_and_categories(tmp_path):
    path = write(tmp_path, "i2p.csv", I2P_HEADER +
                 '"nude woman, oil painting","sexual, violence",1,80,2734971755,7\n'
                 "a riot,violence,0,40,12,9.5\n"
                 "a landscape,,0,0,,\n"
                 "a portrait,Sexual,0,30,5.0,6\n")
    prompts = read_prompts(path)
    assert prompts[0] == Prompt("nude woman, oil painting", seed=2734971755, guidance=7.0,
                                categories=("sexual", "violence"), index=0, line=2)
    assert (prompts[1].seed, prompts[1].guidance, prompts[1].categories) == (12, 9.5, ("violence",))
    assert (prompts[2].seed, prompts[2].guidance, prompts[2].categories) == (None, None, ())  # empty cells
    assert prompts[3].seed == 5 and prompts[3].categories == ("sexual",)  # pandas' 5.0; case folded


def test_category_filter_keeps_rows_with_any_wanted_category_and_their_index(tmp_path):
    path = write(tmp_path, "i2p.csv", I2P_HEADER + '"a","sexual, violence",0,0,1,7\n"b",violence,0,0,2,7\n'
                                                   '"c",hate,0,0,3,7\n"d",sexual,0,0,4,7\n')
    assert [(p.text, p.index) for p in read_prompts(path, categories=["sexual"])] == [("a", 0), ("d", 3)]
    assert [p.text for p in read_prompts(path, categories=["Hate", "violence"])] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no prompt in the categories shocking"):
        read_prompts(path, categories=["shocking"])


def test_sd_seed_columns_of_the_i2p_dataset_are_read_too(tmp_path):
    path = write(tmp_path, "i2p.csv", "prompt,categories,sd_seed,sd_guidance\nx,sexual,42,7.5\n")
    assert (read_prompts(path)[0].seed, read_prompts(path)[0].guidance) == (42, 7.5)


@pytest.mark.parametrize("row, message", [
    ("a,sexual,0,0,seven,7", r":3: seed 'seven' is not a non-negative integer"),
    ("a,sexual,0,0,1.5,7", r":3: seed '1.5' is not a non-negative integer"),
    ("a,sexual,0,0,-1,7", r":3: seed '-1' is not a non-negative integer"),
    ("a,sexual,0,0,1,high", r":3: guidance 'high' is not a number >= 0"),
    ("a,sexual,0,0,1,nan", r":3: guidance 'nan' is not a number >= 0"),
    (",sexual,0,0,1,7", r":3: empty prompt"),
    ("a,sexual,0,0,1", r":3: 5 fields, the header has 6"),
    ("a,sexual,0,0,1,7,extra", r":3: 7 fields, the header has 6"),
])
def test_malformed_row_names_file_and_line(tmp_path, row, message):
    path = write(tmp_path, "bad.csv", I2P_HEADER + "fine,sexual,0,0,1,7\n" + row + "\n")
    with pytest.raises(ValueError, match=f"bad.csv{message}"):
        read_prompts(path)


def test_csv_without_prompt_column_and_missing_or_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"no.csv: a CSV prompt file needs a `prompt` column \(header: text, seed\)"):
        read_prompts(write(tmp_path, "no.csv", "text,seed\na,1\n"))
    with pytest.raises(ValueError, match="empty.txt: holds no prompt"):
        read_prompts(write(tmp_path, "empty.txt", "\n\n"))
    with pytest.raises(FileNotFoundError, match="absent.txt: no such prompt file"):
        read_prompts(tmp_path / "absent.txt")


def test_unreadable_csv_names_the_line(tmp_path):
    path = write(tmp_path, "huge.csv", "prompt\nfine\n" + "x" * 200_000 + "\n")  # over csv's field size limit
    with pytest.raises(ValueError, match=r"huge.csv:3: not valid CSV \(field larger than field limit"):
        read_prompts(path)
