"""Every safety training train.py can run, by its --method name; a new method is its file and one line here.

The options of all methods are merged into train.py's parser: a flag two methods share (--lambda, --harmful-weight)
is one Option object, so it means the same for both."""
from .contrastive import LatentTransformation, NoiseGuidance
from .esd import ESD
from .immunize import Immunize
from .naive import NaiveAscent

METHODS = {"lt": LatentTransformation, "ng": NoiseGuidance, "naive": NaiveAscent, "esd-u": ESD, "esd-x": ESD,
           "immunize": Immunize}


def is_data_free(name: str) -> bool:
    return METHODS[name].data_free


def method_options() -> dict:
    """flag -> (Option, the names of the methods that read it), in the order the methods declare them."""
    merged = {}
    for name, method in METHODS.items():
        for option in method.options:
            known, readers = merged.get(option.flag, (option, []))
            if known is not option:
                raise ValueError(f"methods: {option.flag} is declared twice ({', '.join(readers)} and {name}): "
                                 "share one Option")
            merged[option.flag] = (option, readers + [name])
    return merged


def refuse_foreign_options(args, defaults: dict) -> None:
    """A method option set away from its default (a preset's values count as defaults) for a method that does not
    read it is a mistake, not a no-op: refused, naming the methods that read it."""
    method = METHODS[args.method]
    for flag, (option, readers) in method_options().items():
        if option not in method.options and getattr(args, option.dest) != defaults[option.dest]:
            raise ValueError(f"{flag} is an option of --method {' / '.join(readers)}, not of {args.method}")
