"""CLIPTokenizer against transformers.CLIPTokenizer (the reference SD pipelines call) on the real CLIP vocabulary."""
import json
import random
import shutil

import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("transformers")  # every test here compares with transformers
from transformers import CLIPTokenizer as RefTokenizer

from mini_safediff.models.tokenizer import DEFAULT_FILES, CLIPTokenizer

SD_PADS = {"sd1": "<|endoftext|>", "sd2": "!"}
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    " ",
    "masterpiece, best quality, (highly detailed:1.2), [lowres], ((cat)), dog!!!, ...?! -- #art @user $100 50% &&",
    "A PHOTO OF A CAT, Trending On ArtStation, 8K UHD, DSLR",
    "  extra\twhitespace\n\nand\r\nnewlines   everywhere \u00a0 \u3000 ",
    "1234567890 3.14159 1,000,000 2nd 21st 1girl 4k 1920x1080",
    "don't it's we're they've I'm you'll he'd DON'T It'S rock'n'roll 'quoted' \"double\" ’curly’",
    "<b>bold</b> &amp; <a href='https://example.com/x?y=1'>link</a> <br/> &lt;tag&gt;",
    "café naïve résumé Ærø Straße ŒUVRE İstanbul ΣΊΣΥΦΟΣ e\u0301te\u0301 (decomposed accents)",
    "一只猫坐在窗台上 東京タワー 서울의 밤 Москва красивая مرحبا हिंदी",
    "emoji 🐱🐶 ❤️ 👩‍👩‍👧 🇫🇷 👍🏽 ☕︎ ✨✨✨",
    "hello! hello ! !! !hello ! ! !",
    "a <|endoftext|> b <|startoftext|>c <|ENDOFTEXT|> <|StartOfText|> <|endof text|>",
    "control\x00chars\x07\x7f zero\u200bwidth \ufffd replacement \u2028 line sep",
    "a very long prompt " * 40,
    "supercalifragilisticexpialidocious " * 30 + "end",
]


def random_prompts(count: int, seed: int = 0) -> list[str]:
    """Strings mixing every kind of character the tokenizer treats differently."""
    pool = ["a", "Z", "q", "é", "E\u0301", "ß", "İ", "Σ", "ς", "猫", "タ", "한", "ж", "ع", "ि", "3", "٣", "½", "'", "'s",
            "'T", "!", "?", ".", ",", "-", "_", "~", "<", ">", "|", "&", "\"", "/", " ", "  ", "\t", "\n", "\u00a0",
            "\u3000", "\u200b", "\x00", "\x1b", "🐱", "❤️", "👩‍👧", "🏽", "<|endoftext|>", "<|startoftext|>",
            "<|ENDOFTEXT|>", "cat", "Photo", "HTML", "don't", "<b>", "&amp;"]
    rng = random.Random(seed)
    return ["".join(rng.choices(pool, k=rng.randint(0, 120))) for _ in range(count)]


ALL_PROMPTS = PROMPTS + random_prompts(300)


def reference_ids(ref: RefTokenizer, prompts: list[str]) -> torch.Tensor:
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_tokenizer(ours: CLIPTokenizer, ref: RefTokenizer):
    assert ours.pad_token == ref.pad_token and ours.pad_token_id == ref.pad_token_id
    ids, ref_ids = ours(ALL_PROMPTS), reference_ids(ref, ALL_PROMPTS)
    mismatches = [p for p, a, b in zip(ALL_PROMPTS, ids, ref_ids) if not torch.equal(a, b)]
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:3]!r}"


def reference(pad_token: str) -> RefTokenizer:
    return RefTokenizer(str(DEFAULT_FILES / "vocab.json"), str(DEFAULT_FILES / "merges.txt"), pad_token=pad_token)


@pytest.mark.parametrize("sd", ["sd1", "sd2"])
def test_default_matches_transformers(sd):
    ours = CLIPTokenizer.default(pad_token=SD_PADS[sd])
    assert_same_tokenizer(ours, reference(SD_PADS[sd]))
    assert ours.model_max_length == 77 and ours.pad_token_id == {"sd1": 49407, "sd2": 0}[sd]


@pytest.mark.parametrize("sd", ["sd1", "sd2"])
def test_decode_matches_transformers(sd):
    ours, ref = CLIPTokenizer.default(pad_token=SD_PADS[sd]), reference(SD_PADS[sd])
    rows = ours(ALL_PROMPTS).tolist() + [random.Random(0).sample(range(49408), 20) for _ in range(50)]
    mismatches = [row for row in rows if ours.decode(row) != ref.decode(row, skip_special_tokens=True)]
    assert not mismatches, f"{len(mismatches)} id lists decode differently, e.g. {mismatches[:2]}"


def test_shapes_truncation_and_padding():
    ours = CLIPTokenizer.default()
    one = ours("a photo of a cat")
    assert one.shape == (1, 77) and one.dtype == torch.int64
    assert one[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (one[0, 7:] == 49407).all()
    long = ours(["word " * 100, ""])
    assert long.shape == (2, 77)
    assert long[0, 0] == 49406 and long[0, -1] == 49407 and (long[0, 1:-1] == 2653).all()  # "word</w>"
    assert long[1, :2].tolist() == [49406, 49407]
    sd2 = CLIPTokenizer.default(pad_token="!")("hello!")  # "!" is SD 2's special pad token, even inside a prompt
    assert sd2[0, :4].tolist() == [49406, 3306, 0, 49407] and (sd2[0, 4:] == 0).all()


# special tokens as the published SD 1.5 / 2.1 tokenizer folders write them (the older file format: 2.1's config
# says "<|endoftext|>" but its special_tokens_map.json, which wins, says "!")
def published_files(pad_token: str) -> dict:
    def token(text):
        return {"content": text, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special = {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"), "pad_token": pad_token,
               "unk_token": token("<|endoftext|>")}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
              **{k: {"__type": "AddedToken", **v} for k, v in special.items() if k != "pad_token"}}
    return {"special_tokens_map.json": special, "tokenizer_config.json": config}


def newer_files(pad_token: str) -> dict:
    """tokenizer_config.json with added_tokens_decoder (transformers >= 4.34): it overrides special_tokens_map.json."""
    decoder = {"0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True},
               "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                         "single_word": False, "special": True}}
    return {"special_tokens_map.json": {"pad_token": "<|endoftext|>" if pad_token == "!" else "!"},
            "tokenizer_config.json": {"added_tokens_decoder": decoder, "pad_token": pad_token,
                                      "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}}


def write_folder(folder, files: dict, vocab_files=True):
    folder.mkdir()
    if vocab_files:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(DEFAULT_FILES / name, folder / name)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("layout", ["published", "newer"])
@pytest.mark.parametrize("sd", ["sd1", "sd2"])
def test_vocab_and_merges_folder(tmp_path, sd, layout):
    files = {"published": published_files, "newer": newer_files}[layout](SD_PADS[sd])
    folder = write_folder(tmp_path / "tokenizer", files)
    assert_same_tokenizer(CLIPTokenizer.from_folder(folder), RefTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("keep_config", [False, True])
@pytest.mark.parametrize("sd", ["sd1", "sd2"])
def test_tokenizer_json_folder(tmp_path, sd, keep_config):
    reference(SD_PADS[sd]).save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json + tokenizer_config.json
    assert not (tmp_path / "vocab.json").exists()
    if not keep_config:  # tokenizer.json alone: its added tokens still count, but the pad token falls back to eos
        (tmp_path / "tokenizer_config.json").unlink()
    ours, ref = CLIPTokenizer.from_folder(tmp_path), RefTokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(ours, ref)
    assert ours.pad_token == (SD_PADS[sd] if keep_config else "<|endoftext|>")


@pytest.mark.parametrize("sd", ["sd1", "sd2"])
def test_save_round_trip(tmp_path, sd):
    source = CLIPTokenizer.from_folder(write_folder(tmp_path / "published", published_files(SD_PADS[sd])))
    source.save(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    ref = RefTokenizer.from_pretrained(tmp_path / "saved")
    assert ref.pad_token == SD_PADS[sd] and ref.model_max_length == 77
    assert_same_tokenizer(source, ref)
    assert_same_tokenizer(CLIPTokenizer.from_folder(tmp_path / "saved"), ref)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        CLIPTokenizer.from_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)
    assert "tokenizer.json" in str(error.value) and "vocab.json" in str(error.value)
    folder = write_folder(tmp_path / "half", {}, vocab_files=False)
    shutil.copy(DEFAULT_FILES / "vocab.json", folder / "vocab.json")
    with pytest.raises(FileNotFoundError, match="no merges.txt") as error:
        CLIPTokenizer.from_folder(folder)
    assert "no vocab.json" not in str(error.value)


def test_extra_words_are_refused(tmp_path):
    ref = reference("<|endoftext|>")
    ref.add_tokens(["<cat-toy>"])  # a textual-inversion word: a new id our vocabulary does not have
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<cat-toy>"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.default(pad_token="<pad>")
