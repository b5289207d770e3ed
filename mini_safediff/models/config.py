"""Reading the config.json of a diffusers/transformers component into a small dataclass.

Each model file defines one `@dataclass` whose field names equal the config.json keys it
understands, plus two class attributes:
  FIXED:   keys whose value must equal ours, because we implement only that behaviour
           (e.g. {"act_fn": "silu"}); any other value is refused by name.
  IGNORED: keys that change nothing in this implementation (metadata, training-only options).
Every other key is an unknown option and is refused: a silent mismatch would give wrong
outputs with no error.
"""
import dataclasses
import json
import math
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    pass


# Whole-number options that may be 0 (token ids, shifts); every other one counts something and must be >= 1.
MAY_BE_ZERO = {"freq_shift", "steps_offset", "bos_token_id", "eos_token_id", "pad_token_id"}
# Far above any width, vocabulary or step count of a real model: a larger number is a corrupt config.
LARGEST = 2**20
# Numbers that must be above 0: an epsilon of 0 divides by zero, a latent scale of 0 or less erases or flips latents.
POSITIVE = {"norm_eps", "layer_norm_eps", "scaling_factor"}
# Noise variances per step: 0 adds no noise, 1 or more leaves no signal, and none can be negative.
FRACTIONS = {"beta_start", "beta_end"}
# How an error names each type that a field's annotation allows.
TYPE_NAMES = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
              dict: "a JSON object", list: "a list", type(None): "null"}


def fits(value, kind) -> bool:
    """Whether a config value has the type that a field's annotation (kind) names. JSON's true is no whole number;
    a float must be finite, and a whole number will do."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(fits(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(fits(item, typing.get_args(kind)[0]) for item in value)
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def type_name(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return f"a list of {type_name(typing.get_args(kind)[0]).removeprefix('a ')}s"
    return TYPE_NAMES.get(kind, f"a {kind.__name__}")


def check_range(key: str, value, source: str) -> None:
    if key in POSITIVE or key in FRACTIONS:
        if not 0 < value < (1 if key in FRACTIONS else math.inf):
            raise ConfigError(f"{source}: option {key!r} = {value!r} is out of range (numbers above 0"
                              f"{' and below 1' if key in FRACTIONS else ''})")
        return
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, int) and not isinstance(number, bool):
            low = 0 if key in MAY_BE_ZERO else 1
            if not low <= number <= LARGEST:
                raise ConfigError(f"{source}: option {key!r} = {value!r} is out of range (whole numbers from {low} "
                                  f"to {LARGEST})")


def check_value(key: str, value, kind, source: str) -> None:
    """Type, then range: a wrong one would fail deep inside a model, naming neither the file nor the key."""
    if not fits(value, kind):
        raise ConfigError(f"{source}: option {key!r} = {value!r} must be {type_name(kind)}")
    if value == []:  # no blocks, block types or channels: nothing to build
        raise ConfigError(f"{source}: option {key!r} = [] must not be empty")
    check_range(key, value, source)


def config_from_dict(cls, raw: dict, source: str = "config"):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got a {type(raw).__name__}")
    hints = typing.get_type_hints(cls)  # annotations as types, also where they are written as strings
    kinds = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    fixed = getattr(cls, "FIXED", {})
    ignored = getattr(cls, "IGNORED", set())
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in kinds:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
            check_value(key, kwargs[key], kinds[key], source)
        elif key in fixed:
            allowed = fixed[key] if isinstance(fixed[key], (list, tuple, set)) else [fixed[key]]
            if value not in allowed:
                raise ConfigError(f"{source}: option {key!r} = {value!r} is not supported "
                                  f"(supported: {', '.join(repr(a) for a in allowed)})")
        else:
            raise ConfigError(f"{source}: unknown config option {key!r} = {value!r}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # checks across options, raised by the dataclass itself
        raise ConfigError(f"{source}: {e}") from None


def config_to_dict(config, class_name: str) -> dict:
    return {"_class_name": class_name, **dataclasses.asdict(config)}


def read_config(path, cls):
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(cls, raw, str(path))
