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
from pathlib import Path


class ConfigError(ValueError):
    pass


# Whole-number options that may be 0 (token ids, shifts); every other one counts something and must be >= 1.
MAY_BE_ZERO = {"freq_shift", "steps_offset", "bos_token_id", "eos_token_id", "pad_token_id"}
# Far above any width, vocabulary or step count of a real model: a larger number is a corrupt config.
LARGEST = 2**20


def check_range(key: str, value, source: str) -> None:
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, int) and not isinstance(number, bool):
            low = 0 if key in MAY_BE_ZERO else 1
            if not low <= number <= LARGEST:
                raise ConfigError(f"{source}: option {key!r} = {value!r} is out of range (whole numbers from {low} "
                                  f"to {LARGEST})")


def config_from_dict(cls, raw: dict, source: str = "config"):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got a {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    fixed = getattr(cls, "FIXED", {})
    ignored = getattr(cls, "IGNORED", set())
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
            check_range(key, kwargs[key], source)
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
