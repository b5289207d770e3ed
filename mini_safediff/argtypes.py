"""argparse value types: numbers and ranges checked at parse time, so that a bad value fails with the option's
name before anything loads. On the ground floor (nothing of the package imported): the scripts use them through
cli.py, and a method declares its train.py options with them (methods/method.py's Option); the data rows and the
tokenizer share its text check (utf8_problem).
"""
import argparse
import math


def _number(value: str, kind, ok, what: str):
    """value read as kind (int or float) and checked by ok; else the option's error: what it must be, and what
    was given."""
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not ok(number):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return number


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1 (steps, batch sizes, image counts, intervals)."""
    return _number(value, int, lambda n: n >= 1, "a whole number >= 1")


def natural_int(value: str) -> int:
    """An argparse type: an integer >= 0 (warmup steps, LoRA rank where 0 means off)."""
    return _number(value, int, lambda n: n >= 0, "a whole number >= 0")


def int_up_to(high: int):
    """An argparse type for an integer from 1 to `high` (a count with a hard limit)."""
    def whole_number(value: str) -> int:
        return _number(value, int, lambda n: 1 <= n <= high, f"a whole number from 1 to {high}")
    return whole_number


def finite_float(value: str) -> float:
    """An argparse type: a finite number (float() takes "nan" and "inf", which no scale means)."""
    return _number(value, float, math.isfinite, "a finite number")


def non_negative_float(value: str) -> float:
    """An argparse type: a finite number >= 0 (weight decay)."""
    return _number(value, float, lambda n: 0 <= n < float("inf"), "a finite number >= 0")


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, norms)."""
    return _number(value, float, lambda n: 0 < n < float("inf"), "a finite number > 0")


def step_list(value: str) -> str:
    """An argparse type: comma-separated whole numbers >= 0 ("0,20,100", or "" for none), kept as given."""
    for part in value.split(","):
        if part.strip():
            _number(part.strip(), int, lambda n: n >= 0, "comma-separated whole numbers >= 0 (e.g. 0,20,100)")
    return value


def out_folder(value: str) -> str:
    """An argparse type: an output folder, never "" (which would write into the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string (it would write into the "
                                         "current folder)")
    return value


def _range(value: str, number, low: float, what: str) -> tuple:
    parts = [part.strip() for part in str(value).split(",")]
    try:
        values = tuple(number(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not low <= values[0] <= values[1] < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: give LOW,HIGH (or one value) with {what}")
    return values


def int_range(value: str) -> tuple:
    """An argparse type: "LOW,HIGH" or "N" -> (low, high), whole numbers with 0 <= low <= high (a range drawn from)."""
    return _range(value, int, 0, "whole numbers 0 <= LOW <= HIGH")


def positive_int_range(value: str) -> tuple:
    """int_range with low >= 1."""
    return _range(value, int, 1, "whole numbers 1 <= LOW <= HIGH")


def positive_float_range(value: str) -> tuple:
    """An argparse type: "LOW,HIGH" or "X" -> (low, high), finite numbers with 0 < low <= high."""
    values = _range(value, float, 0, "finite numbers 0 < LOW <= HIGH")
    if values[0] <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give LOW,HIGH (or one value) with finite numbers 0 < LOW <= HIGH")
    return values


def decay(value: str) -> float:
    """An argparse type: an EMA decay in [0, 1) (0: off)."""
    return _number(value, float, lambda n: 0 <= n < 1, "a number in [0, 1) (0: off)")


def utf8_problem(text: str) -> str | None:
    """Why UTF-8 cannot encode `text` (so that neither the tokenizer nor a PNG's metadata can take it), or None.
    The one such text is a lone surrogate: what a JSON escape "\\ud800" without its pair, or a byte of a command
    line that is not UTF-8, decodes to."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"character {error.start} ({text[error.start]!r}) is a lone surrogate"
    return None


def text(value: str) -> str:
    """An argparse type: text that UTF-8 can encode (prompts, concepts)."""
    problem = utf8_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"must be text that UTF-8 can encode, got {value!r}: {problem}")
    return value
