"""The safety loss of contrastive forgetting (Pan et al., NeurIPS 2024; docs/method.md).

For each sample i of a batch (clean or harmful, mixed freely), with eps the drawn noise:
  x_t    = schedule.add_noise(x0, eps', t)       eps' = eps (LT), ng_noise(eps) = eps +- 1 (NG)
  p      = unet(x_t, t, text)
  x0_hat = schedule.predict_x0(x_t, p, t)        the eps OR the v formula, whichever the model predicts
  z      = -x0_hat - 100 (clean), x0_hat + 100 (harmful) for LT;  z = x0_hat for NG
  mu     = running means of z per class, updated with this batch before the distances, never differentiated
  con_i  = d_own - lambda_c * max(0, d_other - margin)   "official", d = ||z - mu||_2 over (C, H, W)
        or d_own + lambda_c * max(0, margin - d_other)   "hinge", the usual contrastive form
  l_i    = w_i * MSE(p, target) + lambda * con_i         w = 1 clean, harmful_weight harmful; target from eps
  loss   = mean_i l_i
The official code runs batch size 1 only, where this is exactly its loss. The mean over the batch (where
the official code would sum the contrastive terms) keeps the learning rate independent of the batch size.
"""
from dataclasses import dataclass

import torch

from .. import argtypes
from ..training.steps import mse
from .method import HARMFUL_WEIGHT, Method, Option

METHODS = ("lt", "ng")
CONTRASTS = ("official", "hinge")
LT_SHIFT = 100.0  # the official code's constant: pushes clean and harmful z far to opposite sides


@dataclass
class SafetyLossConfig:
    method: str = "lt"
    lam: float = 5e-5  # lambda, weight of the contrastive term (paper: 5e-5 for LT; the NG script uses 5e-3)
    lam_contrast: float = 1.0  # lambda_c
    margin: float = 0.0  # l
    contrast: str = "official"
    harmful_weight: float = 0.0  # MSE weight of harmful samples; -0.5 is the "high safety" gradient ascent
    # False reproduces the official code, which adds the term with `.item()`: same loss value, no gradient.
    contrast_grad: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"safety loss: unknown method {self.method!r} (expected one of {METHODS})")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"safety loss: unknown contrast {self.contrast!r} (expected one of {CONTRASTS})")


def _sign(harmful: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """+1 for harmful, -1 for clean samples, shaped (B, 1, 1, 1) to broadcast over like."""
    return (harmful.to(like.device, like.dtype) * 2 - 1).reshape(-1, *[1] * (like.dim() - 1))


def ng_noise(noise: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """NG's shifted noise eps' that builds x_t: eps + 1 for clean, eps - 1 for harmful samples."""
    return noise - _sign(harmful, noise)


def contrast_latent(x0_hat: torch.Tensor, harmful: torch.Tensor, method: str) -> torch.Tensor:
    """z, the latent the class centres are taken over."""
    if method == "ng":
        return x0_hat
    return _sign(harmful, x0_hat) * (x0_hat + LT_SHIFT)


class ContrastiveCentres:
    """Running means of z for the clean (row 0) and the harmful (row 1) class: statistics, not parameters,
    so no gradient flows into them. Started as in the official code: U[0, 1) with a count of 1 each.
    sum_over_ranks (DDP): each update sums the classes' z and counts over all processes first, so every rank
    holds the centres that one process would hold after the whole batch."""

    def __init__(self, shape, generator: torch.Generator, sum_over_ranks: bool = False):
        self.mean = torch.rand((2, *shape), generator=generator)  # (2, C, H, W)
        self.count = torch.ones(2)
        self.sum_over_ranks = sum_over_ranks

    def _to(self, device):
        self.mean, self.count = self.mean.to(device), self.count.to(device)

    @torch.no_grad()
    def update(self, z: torch.Tensor, harmful: torch.Tensor):
        if z.shape[1:] != self.mean.shape[1:]:
            raise ValueError(f"contrastive centres have shape {tuple(self.mean.shape[1:])}, "
                             f"the latents {tuple(z.shape[1:])}")
        self._to(z.device)
        z, harmful = z.detach().float(), harmful.to(z.device, torch.bool).view(-1, *[1] * (z.dim() - 1))
        # masked sums, not z[harmful]: no host sync, deterministic on GPU, and float32 under autocast
        sums = torch.stack([torch.where(harmful, 0.0, z).sum(0), torch.where(harmful, z, 0.0).sum(0)])
        n = torch.stack([(~harmful).sum(), harmful.sum()]).float().view(2, 1, 1, 1)
        if self.sum_over_ranks:  # one collective: the counts ride along as a last column
            packed = torch.cat([sums.flatten(1), n.view(2, 1)], dim=1)  # (2, C*H*W + 1)
            torch.distributed.all_reduce(packed)
            sums, n = packed[:, :-1].view_as(sums), packed[:, -1:].view(2, 1, 1, 1)
        # mean += (sum - n mean) / (count + n): the mean of all z seen so far, with no big running sum
        self.count += n.flatten()
        self.mean += (sums - n * self.mean) / self.count.view(2, 1, 1, 1)

    def distances(self, z: torch.Tensor, harmful: torch.Tensor):
        """d_own, d_other (B,): distances of each z to its own and to the other class centre."""
        self._to(z.device)
        own = harmful.to(z.device).long()
        d_own = (z - self.mean[own]).flatten(1).norm(dim=1)
        d_other = (z - self.mean[1 - own]).flatten(1).norm(dim=1)
        return d_own, d_other

    def centre_distance(self) -> torch.Tensor:
        return (self.mean[0] - self.mean[1]).norm()

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict):
        if state["mean"].shape != self.mean.shape:
            raise ValueError(f"contrastive centres: checkpoint has shape {tuple(state['mean'].shape)}, "
                             f"expected {tuple(self.mean.shape)}")
        self.mean, self.count = state["mean"].float().clone(), state["count"].float().clone()


def safety_loss(pred, x_t, t, x0, noise, harmful, schedule, centres: ContrastiveCentres, cfg: SafetyLossConfig,
                update_centres: bool = True):
    """pred: model output at x_t (built from ng_noise(noise) for NG, from noise for LT); noise: the unshifted eps;
    harmful: (B,) bool. Returns the batch loss and a dict of floats for the log (batch means, unweighted)."""
    pred = pred.float()  # the loss in float32 also under bf16 autocast
    harmful = harmful.to(pred.device, torch.bool)
    mse_rows = mse(pred, schedule.target(x0, noise, t), per_row=True)  # (B,)
    z = contrast_latent(schedule.predict_x0(x_t, pred, t), harmful, cfg.method)
    if update_centres:
        centres.update(z, harmful)
    d_own, d_other = centres.distances(z, harmful)
    if cfg.contrast == "official":  # with margin 0 it rewards d_other without bound
        con = d_own - cfg.lam_contrast * (d_other - cfg.margin).clamp(min=0)
    else:
        con = d_own + cfg.lam_contrast * (cfg.margin - d_other).clamp(min=0)
    if not cfg.contrast_grad:
        con = con.detach()
    weight = torch.where(harmful, cfg.harmful_weight, 1.0)
    loss = (weight * mse_rows + cfg.lam * con).mean()
    stats = torch.stack([loss, mse_rows.mean(), con.mean(), d_own.mean(), d_other.mean(), centres.centre_distance()])
    names = ("loss", "mse", "contrastive", "d_own", "d_other", "centre_distance")
    return loss, dict(zip(names, stats.detach().tolist()))


# The options of the contrastive term (LT, NG, and immunize --immunize-with lt|ng).
CONTRASTIVE_OPTIONS = (
    Option("--lambda", {"dest": "lam", "type": argtypes.finite_float, "metavar": "LAMBDA",
                        "help": "lambda: the weight of the contrastive term"}),
    Option("--lambda-contrast", {"type": argtypes.finite_float, "default": 1.0,
                                 "help": "lambda_c: the weight of d_other inside the contrastive term"}),
    Option("--margin", {"type": argtypes.finite_float, "default": 0.0,
                        "help": "l: the margin of the hinge in the contrastive term"}),
    Option("--contrast", {"choices": CONTRASTS, "default": "official",
                          "help": "the contrastive term: the official code's, or the paper's hinge with --margin"}),
    Option("--no-contrast-grad", {"action": "store_true",
                                  "help": "official code: contrastive term without gradient (.item())"}),
)


def contrastive_config(args, method: str) -> SafetyLossConfig:
    return SafetyLossConfig(method=method, lam=args.lam, lam_contrast=args.lambda_contrast, margin=args.margin,
                            contrast=args.contrast, harmful_weight=args.harmful_weight,
                            contrast_grad=not args.no_contrast_grad)


class LatentTransformation(Method):
    """LT: clean and harmful predictions pushed apart in z = -+(x0_hat + 100)."""
    help = "lt: latent transformation (the paper's)"
    options = (*CONTRASTIVE_OPTIONS, HARMFUL_WEIGHT)
    contrast = "lt"

    def __init__(self, args, pipe, dataset, generator, **setup):
        super().__init__(args, pipe, dataset, generator, **setup)
        self.config = contrastive_config(args, self.contrast)
        size = pipe.unet.config.sample_size
        self.centres = ContrastiveCentres((pipe.unet.config.in_channels, size, size), generator,
                                          sum_over_ranks=self.ddp)

    def loss(self, pred, batch):
        return safety_loss(pred, batch.x_t, batch.t, batch.x0, batch.noise, batch.harmful, self.pipe.schedule,
                           self.centres, self.config)

    def state_dict(self) -> dict:
        return {key: value.clone() for key, value in self.centres.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.centres.load_state_dict(state)


class NoiseGuidance(LatentTransformation):
    """NG: x_t built from noise shifted by -+1, and z = x0_hat."""
    help = "ng: noise guidance (the paper's)"
    contrast = "ng"

    def noise_for_x_t(self, noise, harmful):
        return ng_noise(noise, harmful)
