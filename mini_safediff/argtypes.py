"""argparse value types: numbers and ranges checked at parse time, so that a bad value fails with the option's
name before anything loads. On the ground floor (nothing of the package imported): the scripts use them through
cli.py, and a method declares its train.py options with them (methods/method.py's Option).
"""
import argparse


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1 (steps, batch sizes, image counts, intervals)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return number


def natural_int(value: str) -> int:
    """An argparse type: an integer >= 0 (warmup steps, LoRA rank where 0 means off)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, norms)."""
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


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
    number = float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (0: off), got {value}")
    return number
