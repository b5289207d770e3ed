"""Weight files: read (safetensors first, pickles only through torch's safe loader), strict
loading that names every problem, and saving (written atomically: mini_safediff/io.py).

A model is either fully loaded or not touched: every key and shape is checked before the
first tensor is copied in.
"""
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..io import atomic_write

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# Weight file names inside a diffusers component folder or a transformers model folder, in the order they are tried.
WEIGHT_NAMES = [f"{stem}{variant}.{ext}"
                for ext in ("safetensors.index.json", "safetensors", "bin.index.json", "bin")
                for variant in ("", ".fp16")
                for stem in ("diffusion_pytorch_model", "model", "pytorch_model")]


class WeightsError(ValueError):
    pass


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors file, a sharded `*.safetensors.index.json`, or a .ckpt/.pt/.bin
    pickle that torch's weights_only loader accepts (pickles that need code are refused)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if path.name.endswith(".index.json"):
        state_dict = {}
        for shard in shard_files(path):
            state_dict.update(read_state_dict(shard))
        return state_dict
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise WeightsError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise WeightsError(f"{path}: unknown weight file type {path.suffix!r} "
                       f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")


def shard_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names in its weight_map, each inside the index's own folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{index}: not a valid shard index, invalid JSON ({e})") from None
    except (KeyError, TypeError):
        raise WeightsError(f"{index}: not a valid shard index, it has no \"weight_map\" object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: \"weight_map\" must map tensor names to shard file names")
    folder = index.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (folder / name).resolve()
        if shard.parent != folder:  # a published index names files beside it; anything else is refused
            raise WeightsError(f"{index}: shard {name!r} lies outside the model folder {folder}")
        shards.append(shard)
    return shards


def _read_pickle(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[-1]
        raise WeightsError(
            f"{path}: refused: this pickle needs arbitrary code to unpickle, which could run anything "
            f"on your machine. Convert it to .safetensors with a tool you trust. ({first_line})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable checkpoint, truncated or corrupt ({e})") from None
    if isinstance(obj, dict) and {"unet", "optimizer", "generator", "step"} <= obj.keys():
        model = path.parent / "model"
        raise WeightsError(f"{path}: a training checkpoint of train.py / attack.py (weights, optimizer and random "
                           f"state at step {obj['step']}, to continue with --resume), not a model; the finished "
                           f"model is {model}" + ("" if model.exists() else " (not written yet: the run has not "
                                                                           "finished)"))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / CompVis checkpoints nest the weights
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    # CompVis checkpoints carry a few non-tensor entries (e.g. epoch counters) beside the weights.
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def read_metadata(path) -> dict:
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _listed(title: str, items: list, limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def load_strict(module: torch.nn.Module, state_dict: dict, source: str) -> torch.nn.Module:
    """Load `state_dict` into `module` after checking every key and shape; report all problems by name."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = sorted(f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                        for key in expected.keys() & state_dict.keys()
                        if state_dict[key].shape != expected[key].shape)
    mismatched += sorted(f"{key}: file holds {state_dict[key].dtype}, expected floating-point weights"
                         for key in expected.keys() & state_dict.keys()
                         if expected[key].is_floating_point() and not state_dict[key].is_floating_point())
    if missing or unexpected or mismatched:
        report = ""
        if missing:
            report += _listed("missing keys", missing)
        if unexpected:
            report += _listed("unexpected keys", unexpected)
        if mismatched:
            report += _listed("shape or dtype mismatches", mismatched)
        raise WeightsError(f"{source}: does not fit {type(module).__name__}:{report}")
    # Modules are built on the meta device: assign=True adopts the file's tensors with no copy.
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_NAMES[:3])}, ...)")


def build_model(model_class, config, state_dict: dict, source: str, dtype=None) -> torch.nn.Module:
    """model_class(config) with the state dict's own tensors (built on the meta device: no random init, no copy),
    strictly loaded, in eval mode and frozen."""
    with torch.device("meta"):
        model = model_class(config)
    load_strict(model, state_dict, source)
    return model.to(dtype).eval().requires_grad_(False)


def save_state_dict(state_dict: dict, path, metadata: dict | None = None) -> None:
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
