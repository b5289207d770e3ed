"""CLIP's BPE tokenizer as Stable Diffusion calls it: every prompt becomes 77 ids,
<|startoftext|> ... <|endoftext|>, truncated and padded.

The reference is transformers.CLIPTokenizer. Since transformers 5 that class is no longer the
Python BPE loop (with its ftfy / BasicTokenizer text cleaning) but a `tokenizers` pipeline built
in its __init__, and CLIPTokenizerFast is the same class. We build that same pipeline here, and
resolve the special tokens from a model folder exactly as its from_pretrained does, because their
flags change ids: a token "normalized" is also found in upper case, and SD 2's pad token "!" is a
special token, so "hello!" ends in id 0 rather than "!</w>" (256).
"""
import json
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from ..argtypes import utf8_problem

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# a word is a special token, an English contraction, a run of letters, one digit, or a run of anything else but spaces
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULT_FILES = Path(__file__).resolve().parent / "tokenizer_data"
# defaults, in the order transformers adds them: when two share a text (SD 1: eos and pad), the later one's flags win
NAMED_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
# The normalizer's whitespace (\s, Unicode's White_Space): Python's \s holds \x1c-\x1f besides, which CLIP keeps.
SPACE, NON_SPACE = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
SPACES = re.compile(SPACE + "+")


def added_token(value: str | dict | AddedToken) -> AddedToken:
    """A special token as tokenizer files write it: a bare string, or a dict with its matching flags."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)  # a bare string matches the raw text only (normalized=False)
    flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return AddedToken(value["content"], special=True, **flags)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a JSON object was expected, not a {type(content).__name__}")
    return content


class CLIPTokenizer:
    model_max_length = 77  # CLIP's position embeddings; SD always pads to it, whatever a tokenizer_config says

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], bos_token=BOS, eos_token=EOS,
                 unk_token=EOS, pad_token=EOS, added_tokens=()):
        """The *_token arguments and `added_tokens` are strings, AddedTokens or their dicts from the files;
        an entry of `added_tokens` overrides the flags of a named token with the same text."""
        named = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
        named = {key: added_token(value) for key, value in named.items()}
        tokens = {t.content: t for t in named.values()} | {t.content: t for t in map(added_token, added_tokens)}
        unknown = [text for text in tokens if text not in vocab]
        if unknown:
            raise ValueError(f"tokens {unknown} are not in the vocabulary (extra words such as textual-inversion "
                             "tokens are not supported)")
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (t.content for t in named.values())
        self.pad_token_id = vocab[self.pad_token]

        self.backend = Tokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=self.unk_token))
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # GPT-2's byte-level step gives every byte a printable stand-in in the vocabulary; its own split is kept
        # (as transformers runs it) because it cuts words CLIP's split leaves whole, e.g. an upper-case "<|ENDOFTEXT|>"
        self.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.backend.post_processor = TemplateProcessing(
            single=f"{self.bos_token} $A {self.eos_token}",
            special_tokens=[(self.bos_token, vocab[self.bos_token]), (self.eos_token, vocab[self.eos_token])])
        self.backend.decoder = decoders.ByteLevel()  # the byte stand-ins back to text; "</w>" stays, see decode
        self.backend.add_special_tokens(list(tokens.values()))
        # truncation leaves room for the two tokens the template adds, so the end token always survives
        self.backend.enable_truncation(self.model_max_length)
        self.backend.enable_padding(length=self.model_max_length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        # BPE costs time and memory in proportion to the whole text (a 100 MB caption: 10 GB and 100 s) though
        # only 77 tokens are kept, so a long text is cut first (cut()). A token spans at most `longest` bytes of the
        # normalized text (the longest vocabulary entry, one character per byte) and so at most 4 * longest
        # characters of the text (NFC composes at most four into one), whitespace aside: the 77 tokens lie in its
        # first 77 * 4 * longest non-space characters. The cut comes after twice that many; it can change only
        # tokens of the word it falls in, near it (BPE's merges reach a few characters), far past the last one kept.
        longest = max(len(token.removesuffix("</w>")) for token in vocab)
        self.max_chars = 2 * self.model_max_length * 4 * longest
        self.first_chars = re.compile(f"(?:{SPACE}*{NON_SPACE}){{{self.max_chars}}}")

    def cut(self, text: str) -> str:
        """The part of text that its 77 tokens come from: its first max_chars non-space characters, each run of
        whitespace made one space as the normalizer makes it (NFC, before it, neither makes nor removes whitespace),
        so that a text of mostly whitespace is short too."""
        if len(text) <= self.max_chars:
            return text
        enough = self.first_chars.match(text)
        return SPACES.sub(" ", text[:enough.end()] if enough else text)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 ids, as tokenizer(prompts, padding="max_length", max_length=77, truncation=True)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [self.cut(prompt) for prompt in prompts]
        for prompt in prompts:
            problem = utf8_problem(prompt)
            if problem:
                raise ValueError(f"cannot tokenize {prompt[:80]!r}: UTF-8 cannot encode it ({problem})")
        return torch.tensor([encoding.ids for encoding in self.backend.encode_batch(prompts)])

    def decode(self, ids) -> str:
        """The text of token ids without the special tokens, as transformers' decode(ids, skip_special_tokens=True):
        each word's end marker "</w>" becomes a space."""
        return self.backend.decode(list(ids), skip_special_tokens=True).replace("</w>", " ").strip()

    @classmethod
    def default(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """OpenAI's CLIP vocabulary shipped with the package; SD 1 pads with <|endoftext|>, SD 2 with "!"."""
        return cls(*BPE.read_file(str(DEFAULT_FILES / "vocab.json"), str(DEFAULT_FILES / "merges.txt")),
                   pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        """A transformers tokenizer folder: tokenizer.json, or vocab.json + merges.txt (transformers prefers the
        first when both are there), with the special tokens of tokenizer_config.json / special_tokens_map.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        if (folder / "added_tokens.json").is_file():
            raise ValueError(f"{folder / 'added_tokens.json'}: extra words (e.g. textual inversion) are not supported")
        config = read_json(folder / "tokenizer_config.json")
        if config.get("extra_special_tokens") or config.get("additional_special_tokens"):
            raise ValueError(f"{folder}: extra special tokens are not supported")
        tokenizer_json = read_json(folder / "tokenizer.json")
        if tokenizer_json:
            model = tokenizer_json.get("model")
            if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) \
                    or not isinstance(model.get("merges"), list):
                kind = model.get("type") if isinstance(model, dict) else None
                raise ValueError(f"{folder / 'tokenizer.json'}: no BPE model with a vocab and merges"
                                 + (f" (it holds a {kind} model)" if kind not in (None, "BPE") else ""))
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]  # old or new
        else:
            missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"no CLIP tokenizer in {folder}: it has no tokenizer.json and no "
                                        f"{' and no '.join(missing)} (need tokenizer.json, or vocab.json + merges.txt)")
            try:
                vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
                raise ValueError(f"{folder}: vocab.json or merges.txt is not a BPE vocabulary ({e})") from None

        if "added_tokens_decoder" in config:  # files written by transformers >= 4.34: the config alone decides
            listed, names = config["added_tokens_decoder"], config
            listed = [listed[index] for index in sorted(listed, key=int)]
        else:  # older files (the published SD folders): special_tokens_map.json overrides the config
            listed = tokenizer_json.get("added_tokens", [])
            names = config | read_json(folder / "special_tokens_map.json")
        named = {key: names.get(key) or default for key, default in NAMED_TOKENS.items()}
        return cls(vocab, merges, **named, added_tokens=listed)

    def save(self, folder: str | Path):
        """vocab.json + merges.txt + the two special-token files, like the published SD folders. The flags of the
        special tokens go into added_tokens_decoder, so transformers (and from_folder) read back the same ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.model.save(str(folder))
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token}
        added = {str(i): token.__getstate__() for i, token in sorted(self.backend.get_added_tokens_decoder().items())}
        config = {**named, "added_tokens_decoder": added, "model_max_length": self.model_max_length,
                  "tokenizer_class": "CLIPTokenizer"}
        for name, content in (("special_tokens_map.json", named), ("tokenizer_config.json", config)):
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
