"""Erasing concepts from diffusion models, ESD (Gandikota et al., ICCV 2023): data-free fine-tuning that makes
the UNet's prediction for a concept point away from it, as negative guidance of a frozen copy of the start.

Per sample, with c the concept's text, "" the empty prompt and eps* the frozen starting UNet:
  k      ~ U{0, ..., 49}                          a step of a fixed 50-step DDIM schedule
  x_t    = DDIM from N(0, I) towards c with guidance 3, by the model being trained, stopped after its step
           of index k - 1 (counted from the end; all 50 steps for k = 0), as ESD's script samples
  t      ~ U{round(1000 k / 50), ..., round(1000 (k + 1) / 50) - 1}
  target = eps*(x_t, t, "") - eta (eps*(x_t, t, c) - eps*(x_t, t, ""))
  loss   = MSE(eps(x_t, t, c), target)            eta: --negative-guidance, 1 in the paper
The script's x_t is a little less noisy than t says (it stops one to three DDIM steps past t); kept as ESD
has it. The target is an affine combination (weights summing to 1) of predictions at one x_t, so it means the
same for v-prediction models.

Which weights train (ESD's train_method, named after the LDM keys it filters):
  esd-u ("noxattn"): every UNet weight except cross-attention (attn2), the time embedding (time_embed ->
         time_embedding) and the output layers (out. -> conv_norm_out, conv_out)
  esd-x ("xattn"):   only cross-attention, every weight of each attn2 (to_q, to_k, to_v, to_out)
"""
import copy
from dataclasses import dataclass

import torch

from .. import argtypes
from ..distributed import shard
from ..models import samplers
from ..training.steps import mse
from .method import Batch, Method, Option

ESD_METHODS = ("esd-u", "esd-x")
# ESD's script: the DDIM schedule the sample is drawn along, and the guidance it is drawn with.
DDIM_STEPS = 50
START_GUIDANCE = 3.0


def trains(name: str, method: str) -> bool:
    """Whether ESD's `method` trains the UNet parameter of this (diffusers) name."""
    if method == "esd-x":
        return ".attn2." in name
    if method == "esd-u":
        return ".attn2." not in name and not name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
    raise ValueError(f"unknown ESD method {method!r} (choose from {', '.join(ESD_METHODS)})")


def select_parameters(unet, method: str) -> list:
    """Freezes every UNet parameter that `method` does not train; returns those it trains."""
    chosen = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(trains(name, method))
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen


def esd_target(frozen, x_t, t, concept: tuple, empty: tuple, negative_guidance: float) -> torch.Tensor:
    """eps*(x_t, t, "") - eta (eps*(x_t, t, c) - eps*(x_t, t, "")) from the frozen UNet, both in one call.
    concept, empty: (context, added) of the concepts and of the empty prompt, as pipe.conditioning gives them."""
    added = {key: torch.cat([empty[1][key], concept[1][key]]) for key in concept[1]}
    e_empty, e_concept = frozen(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty[0], concept[0]]),
                                **added).float().chunk(2)
    return e_empty - negative_guidance * (e_concept - e_empty)


@torch.no_grad()
def esd_batch(pipe, frozen, concepts: list, batch_size: int, negative_guidance: float, generator,
              rank: int = 0, world_size: int = 1):
    """One step's (x_t, t, context, added, target) for this rank's rows of a global batch: each row a concept
    drawn from `concepts`, its own start noise and t, the batch one k. Every random number comes from
    `generator`, drawn for the whole batch on every rank (the same run under any number of processes)."""
    k = int(torch.randint(0, DDIM_STEPS, (), generator=generator))
    low, high = round(1000 * k / DDIM_STEPS), round(1000 * (k + 1) / DDIM_STEPS)
    t = torch.randint(low, high, (batch_size,), generator=generator)
    rows = torch.randint(0, len(concepts), (batch_size,), generator=generator).tolist()
    factor, size = pipe.vae_scale_factor, pipe.unet.config.sample_size
    noise = torch.randn((batch_size, pipe.unet.config.in_channels, size, size), generator=generator)
    texts, t, noise = shard([concepts[i] for i in rows], rank, world_size), shard(t, rank, world_size), \
        shard(noise, rank, world_size)
    model_fn = pipe.guided_model(texts, [""] * len(texts), START_GUIDANCE, size * factor, size * factor)
    # ESD stops after the step of index k - 1 counted from the end: the first DDIM_STEPS - k + 1 steps
    x_t = samplers.ddim(model_fn, noise.to(pipe.device, pipe.dtype), pipe.schedule, DDIM_STEPS, progress=False,
                        stop_after=min(DDIM_STEPS, DDIM_STEPS - k + 1))
    t = t.to(pipe.device)
    context, added = pipe.conditioning(texts, size * factor, size * factor)
    empty = pipe.conditioning([""] * len(texts), size * factor, size * factor)
    target = esd_target(frozen, x_t, t, (context, added), empty, negative_guidance)
    return x_t, t, context, added, target


@dataclass
class ESDBatch(Batch):
    target: torch.Tensor = None


class ESD(Method):
    """esd-u and esd-x: which weights train is the only difference (trains())."""
    help = ("esd-u / esd-x: the ESD baseline, data-free: esd-u trains every UNet weight except cross-attention "
            "(attn2), the time embedding and the output layers (ESD's noxattn), esd-x only every cross-attention "
            "(attn2) weight (ESD's xattn)")
    options = (Option("--concept", {"action": "append", "type": argtypes.text, "help": "the concept to erase, as text; repeatable, each "
                                                                "step draws one per row (default: none, which ESD "
                                                                "refuses)"}),
               Option("--negative-guidance", {"type": argtypes.finite_float, "default": 1.0,
                                              "help": "eta, how far the target points away from the concept"}))
    data_free = True
    default_preset = "esd"

    @classmethod
    def check(cls, args):
        if not args.concept:
            raise ValueError(f"--method {args.method} erases a concept: give it with --concept TEXT")
        if any(not concept.strip() for concept in args.concept):
            raise ValueError(f"--method {args.method}: --concept {args.concept!r} has an empty concept")

    def __init__(self, args, pipe, dataset, generator, **setup):
        super().__init__(args, pipe, dataset, generator, **setup)
        # The targets come from a frozen copy of the starting UNet, rebuilt from --model / --unet on resume (train.py
        # refuses an --out that would overwrite them).
        self.frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
        self.trained = select_parameters(pipe.unet, args.method)

    def parameters(self):
        return self.trained

    def describe(self):
        return f"erasing {' | '.join(self.args.concept)}"

    def batch(self, index):
        """x_t sampled by the model being trained, the target from the frozen start."""
        args = self.args
        return ESDBatch(*esd_batch(self.pipe, self.frozen, args.concept, args.batch_size, args.negative_guidance,
                                   self.generator, self.rank, self.world_size))

    def loss(self, pred, batch):
        loss = mse(pred, batch.target)
        return loss, {"loss": loss.item(), "target_norm": batch.target.flatten(1).norm(dim=1).mean().item()}
