"""The command-line convention shared by train.py, attack.py, evaluate.py and `python -m mini_safediff.sample`:
`--help` shows the script's docstring as written and every option's default; the model options (--model,
--unet, --prediction-type, --device, --dtype) and --quiet mean the same in each.

An option whose default is None or "" says in words what happens without it ("default: on CUDA"), so the help
never prints "default: None".
"""
import argparse
import json
import re
from pathlib import Path

import torch

# The value types of the options, on the ground floor so that a method can declare its options with them; used
# here and by the scripts as cli.positive_int and so on.
from .argtypes import (decay, finite_float, int_range, int_up_to, natural_int, non_negative_float,  # noqa: F401
                       out_folder, positive_float, positive_float_range, positive_int, positive_int_range, step_list,
                       text)
from .methods.sld import SLD_PRESETS, sld_config
from .miniature.settings import SAMPLING_GUIDANCE, SAMPLING_STEPS
from .models.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .models.weights import PICKLE_SUFFIXES

DTYPES = ("float32", "bfloat16", "float16")
TRAINING_DTYPES = ("float32", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# A model's name becomes a folder name (attack.py's --out/NAME, evaluate.py's images/NAME): no path in it.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and "(default: X)" after every option that has a default, except None and ""
    (the help says in words what happens) and False (an on/off flag is off unless given)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def device(value: str) -> str:
    """An argparse type: a device torch knows and this machine has."""
    try:
        parsed = torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device ({e})") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{value}: no such CUDA device on this machine "
                                         f"({torch.cuda.device_count()} found)")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value}: choose cpu, cuda or cuda:N")
    return value


def safety_guidance(value: str):
    """An argparse type: Safe Latent Diffusion's setting, a preset name or a JSON object of its settings
    ('{"guidance_scale": 500}'); returns the name or the dict, checked."""
    setting = value
    if value.lstrip().startswith("{"):
        try:
            setting = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object ({e})") from None
    try:
        sld_config(setting)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return setting


SAFETY_GUIDANCE_HELP = (f"Safe Latent Diffusion: a preset ({', '.join(SLD_PRESETS)}) or a JSON object of its "
                        "settings warmup_steps, guidance_scale, threshold, momentum_scale, mom_beta (with or without "
                        "the sld_ prefix; those not given keep the medium preset's values)")


def harmful_digits(value: str) -> list[int]:
    """An argparse type: comma-separated digits 0-9 that play the harmful concept -> the sorted distinct digits;
    at least one clean digit must be left over."""
    chosen = [d.strip() for d in str(value).split(",")]
    if not set(chosen) <= {str(d) for d in range(10)} or len(set(chosen)) == 10:
        raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated digits from 0 to 9, not all ten")
    return sorted({int(d) for d in chosen})


def fill_sampling_defaults(args) -> None:
    """--sampling-steps and --guidance left unset: the miniature's fixed sampling with the digit judge, the usual Stable
    Diffusion defaults with any other."""
    miniature = args.judge == "digits"
    if args.sampling_steps is None:
        args.sampling_steps = SAMPLING_STEPS if miniature else DEFAULT_STEPS
    if args.guidance is None:
        args.guidance = SAMPLING_GUIDANCE if miniature else DEFAULT_GUIDANCE


class OtherName(argparse.Action):
    """A name that means another option here (--steps is optimizer steps in train.py, sampler steps are
    --sampling-steps): refused, naming the right one (hidden from --help)."""

    def __init__(self, option_strings, dest, new: str, why: str, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: use {self.new} here ({self.why})")


def add_other_name(p: argparse.ArgumentParser, name: str, right: str, why: str) -> None:
    p.add_argument(name, action=OtherName, new=right, why=why)


SAMPLING_STEPS_WHY = "sampler steps; --steps means optimizer steps, in train.py and attack.py finetune"


def flag_names(p: argparse.ArgumentParser) -> dict:
    """argparse dest -> the option that sets it (lam -> --lambda)."""
    return {action.dest: action.option_strings[0] for action in p._actions if action.option_strings}


def make_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def training_dtype(value: str) -> str:
    """--dtype of the training scripts: float16 autocast would need a gradient scaler, which they do not have."""
    if value == "float16":
        raise argparse.ArgumentTypeError("float16 is refused in training: its gradients would need a gradient "
                                         "scaler, which train.py and attack.py do not use; use bfloat16 or float32")
    return value


def add_model_options(p: argparse.ArgumentParser, several: bool = False, training: bool = False,
                      model_default_help: str = "the built-in model") -> None:
    """--model (one PATH, or with several=True repeatable NAME=PATH), --unet, --prediction-type, --device and
    --dtype (training=True: the autocast precision over float32 weights; otherwise the weights' dtype)."""
    if several:
        p.add_argument("--model", action="append", metavar="[NAME=]PATH",
                       help="a diffusers folder or single file, repeatable; NAME names its output folder (a bare "
                            "PATH is named after its folder: runs/lt/model -> lt; a file after its stem) "
                            f"(default: {model_default_help})")
    else:
        p.add_argument("--model", metavar="PATH", help="a diffusers folder or single file (default: the built-in "
                                                       "tiny model, weights/ of this repository)")
    p.add_argument("--unet", metavar="PATH",
                   help=f"UNet weights (diffusers or LDM keys) loaded over {'every' if several else 'the'} --model, "
                        "e.g. an already-safe UNet (default: the model's own UNet)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (default: as the model's scheduler config says; single files of "
                        "v-models such as SD 2.x 768 need v_prediction)")
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: CUDA when available, else the CPU)")
    if training:
        p.add_argument("--dtype", type=training_dtype, choices=TRAINING_DTYPES,
                       help="autocast compute precision; the weights stay float32 (default: bfloat16 on CUDA, "
                            "float32 on the CPU; float16 is refused: it would need a gradient scaler)")
    else:
        p.add_argument("--dtype", choices=DTYPES, default="float32", help="the weights' dtype for inference")


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, data and checkpoint options that train.py and attack.py share."""
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--adam-bf16", action="store_true", help="AdamW with its moments in bfloat16 (half the state)")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradients are clipped to this norm")
    p.add_argument("--random-flip", action="store_true", help="flip images horizontally at random")
    p.add_argument("--skip-bad", action="store_true", help="skip bad data rows (with a count) instead of stopping")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass (default: on CUDA)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints for --resume")


def add_resume_options(p: argparse.ArgumentParser, checkpoint: str) -> None:
    p.add_argument("--resume", action="store_true", help=f"continue from {checkpoint}")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: continue even where settings that define the run differ from the checkpoint's")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def autocast_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The training --dtype as a torch dtype: bfloat16 on CUDA and float32 on the CPU unless one was given."""
    return getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def default_name(path: str) -> str:
    """The name a bare --model PATH gets: its folder's (runs/lt/model -> lt), a weight file's stem
    (w.safetensors -> w; runs/lt/model.safetensors -> lt)."""
    path = Path(path)
    name = path.stem if path.suffix in WEIGHT_SUFFIXES or path.is_file() else path.name
    return path.parent.name if name == "model" else name


def model_pairs(options: list, option: str = "--model") -> list[tuple[str, str]]:
    """(name, path) for each `NAME=PATH` or bare `PATH`. Names become folder names, so each must be a plain name
    (letters, digits, -, _, ., +; not starting with .) and given once."""
    pairs = []
    for value in options:
        name, path = value.split("=", 1) if "=" in value else (default_name(value), value)
        if not PLAIN_NAME.fullmatch(name):
            raise ValueError(f"{option} {value}: {name!r} is not a plain name (letters, digits, -, _, ., +; not "
                             f"starting with .): it names the model's output folder; write {option} NAME=PATH")
        if name in [known for known, _ in pairs]:
            raise ValueError(f"{option} {value}: the name {name!r} is given twice; give each model its own "
                             f"NAME with {option} NAME=PATH")
        pairs.append((name, path))
    return pairs


def apply_preset(p: argparse.ArgumentParser, presets: dict, argv, default: str) -> None:
    """Adds --preset and makes the chosen preset's values the parser's defaults (what --help shows too); an
    option given explicitly wins over its preset value."""
    options = {action.dest: action.option_strings[0] for action in p._actions}

    def as_option(dest, value):
        if isinstance(value, bool):  # an on/off option
            return options[dest] if value else "--no-" + options[dest].removeprefix("--")
        return f"{options[dest]} {value}"
    p.add_argument("--preset", choices=sorted(presets), default=default,
                   help="the defaults of the options it sets: " + "; ".join(
                       f"{name}: " + " ".join(as_option(dest, value) for dest, value in values.items())
                       for name, values in presets.items()))
    chosen = argparse.ArgumentParser(add_help=False)
    chosen.add_argument("--preset", choices=sorted(presets), default=default)
    known, _ = chosen.parse_known_args(argv)
    p.set_defaults(**presets[known.preset])
