"""What a safety training is to train.py: one class per method, each in its own file, listed in registry.py.

train.py's loop asks a method for four things and names none:

    method = METHODS[args.method](args, pipe, dataset, generator, ddp=..., rank=..., world_size=..., autocast=...)
    optimizer = adamw(method.parameters(), ...)
    batch = method.batch(index)                                  # x_t, t, context, added, and what its loss needs
    loss, stats = method.loss(net(batch.x_t, batch.t, batch.context, **batch.added), batch)

and keeps `method.state_dict()` in its checkpoints. A method declares the train.py options it reads
(`options`); train.py adds every method's options to its parser and refuses one given to a method that does not
read it. The base class is the data-driven method: a batch of --data rows, its latents, noise and timesteps.
"""
import contextlib
from dataclasses import dataclass, field

import torch

from .. import argtypes
from ..training.data import load_batch
from ..training.steps import draw_noise_and_timesteps, encode_batch


@dataclass(frozen=True)
class Option:
    """One train.py option: its flag and the keywords of argparse's add_argument."""
    flag: str
    settings: dict = field(default_factory=dict, hash=False)

    @property
    def dest(self) -> str:
        return self.settings.get("dest", self.flag.removeprefix("--").replace("-", "_"))


HARMFUL_WEIGHT = Option("--harmful-weight", {"type": argtypes.finite_float,
                                             "help": "MSE weight of harmful rows (-0.5: the official code's high "
                                                     "safety, an ascent)"})


@dataclass
class Batch:
    """What the UNet is called with, as `unet(x_t, t, context, **added)`."""
    x_t: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    added: dict


@dataclass
class DataBatch(Batch):
    """A batch of --data rows: their latents x0, the unshifted noise and which rows are harmful."""
    x0: torch.Tensor = None
    noise: torch.Tensor = None
    harmful: torch.Tensor = None


class Method:
    """A safety training on --data rows (clean and harmful). Subclasses set the class attributes, write loss(),
    and override what they do differently."""
    help = ""  # --method's help for it, one phrase
    options: tuple = ()  # the train.py options it reads (Option)
    data_free = False  # it trains on no --data rows
    default_preset = "paper"  # train.py's --preset when none is given
    distributed = True  # it runs under torchrun

    @classmethod
    def check(cls, args) -> None:
        """Refuses settings of this method that make no sense, before anything is loaded (ValueError)."""

    def __init__(self, args, pipe, dataset, generator: torch.Generator, *, ddp: bool = False, rank: int = 0,
                 world_size: int = 1, autocast=contextlib.nullcontext):
        """generator: the run's one generator (VAE samples, noise, timesteps, whatever the method draws);
        autocast: the context the model is called in."""
        if not self.data_free and not dataset.harmful.any():
            raise ValueError(f"--method {args.method} trains the model away from harmful rows: {dataset.metadata} "
                             f"has {len(dataset)} rows, none of them harmful (class 2)")
        self.args, self.pipe, self.dataset, self.generator = args, pipe, dataset, generator
        self.ddp, self.rank, self.world_size, self.autocast = ddp, rank, world_size, autocast

    def parameters(self) -> list:
        """The parameters it trains (the UNet's; the VAE and the text encoder stay frozen)."""
        return list(self.pipe.unet.parameters())

    def describe(self) -> str:
        """What it trains on, for the start line."""
        return f"on {len(self.dataset)} rows ({int(self.dataset.harmful.sum())} harmful)"

    def noise_for_x_t(self, noise: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
        """The noise x_t is built from (NG shifts it)."""
        return noise

    def batch(self, index: int) -> Batch:
        """Batch number `index` of the run (micro-batches counted), this process's rows of it."""
        args, pipe = self.args, self.pipe
        rows = load_batch(self.dataset, args.batch_size, index, args.seed, args.balanced, self.rank, self.world_size)
        x0, context, added = encode_batch(pipe, rows, self.generator, self.rank, self.world_size)
        noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, self.generator,
                                            self.rank, self.world_size)
        harmful = rows["harmful"].to(pipe.device)
        x_t = pipe.schedule.add_noise(x0, self.noise_for_x_t(noise, harmful), t)
        return DataBatch(x_t, t, context, added, x0=x0, noise=noise, harmful=harmful)

    def loss(self, pred: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The batch loss and a dict of floats for the log (its "loss" included)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it besides the weights (a copy: the run goes on changing its own)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
