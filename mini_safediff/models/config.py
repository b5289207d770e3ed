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


def config_from_dict(cls, raw: dict, source: str = "config"):
    fields = {f.name for f in dataclasses.fields(cls)}
    fixed = getattr(cls, "FIXED", {})
    ignored = getattr(cls, "IGNORED", set())
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
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
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(cls, raw, str(path))
