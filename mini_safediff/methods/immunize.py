"""Immunization by simulated attacks (beyond the paper; docs/immunize.md): meta-learning against malicious
fine-tuning. Each outer step simulates the attacker (a few plain fine-tuning steps on harmful rows, from the
current weights) and asks that the harmful loss stay HIGH after it, besides the clean loss staying low and the
harmful loss being pushed up now.

Per outer step, on a batch of B rows (clean and harmful mixed, as for LT), with theta the UNet's weights:
  mse_i(theta)    MSE of row i to its eps / v target (the plain diffusion loss, per row)
  attack          drawn from the run's generator: K ~ U{K_lo..K_hi}, lr ~ log-U[lr_lo, lr_hi],
                  inner batch b ~ U{b_lo..b_hi} harmful rows (fresh rows, noise and t for each inner step)
  phi_0 = theta,  phi_{k+1} = phi_k - lr * update(grad L_attack(phi_k))      update: SGD, or Adam from zero moments
  l_i  = w_i mse_i(theta) - a [harmful_i] min(mse_i(phi_K), cap)               w_i = 1 clean, w_h harmful
  loss = (1 / B) sum_i l_i

- w_h < 0 (--harmful-weight, -0.5 by default) is the naive baseline's gradient ascent on the harmful rows: it
  removes the concept from the weights as released (the attacker with K = 0), while the post-attack term looks
  at K >= 1 only (the default range). Unbounded, as in the naive baseline (kept so that K = 0 reduces to it);
  the clean term and the small outer lr hold it, as they do there.
- The post-attack term is subtracted (to be made high) and capped per row at `cap` (1.0 by default: the MSE of
  a model that predicts zero for an eps target of unit variance, i.e. one that knows nothing of the harmful rows).
  Past the cap the row gives no gradient, so the term cannot run away, and the weights are not pushed to make the
  attacked model worse than "knows nothing", which would only cost clean quality. A log would also slow it, but
  never stop it.
- K = 0 gives phi_K = theta: the row's term is w_h mse - a min(mse, cap), the naive loss with harmful weight
  w_h - a (below the cap). tests/test_immunize.py checks it against contrastive.safety_loss with lambda 0.
- Gradient ("--inner-grad"): "exact" differentiates through the K inner steps (second order, functional_call on
  the weights as a graph); "first-order" (the default) takes grad_phi of the post-attack term at phi_K, the
  attacked weights, and applies it to theta (first-order MAML). They differ by O(lr): d phi_K / d theta =
  prod_k (I - lr H_k) for SGD (tested). With Adam they do NOT agree: its update g / (sqrt(v) + eps) has the
  derivative ~ eps / (|g| + eps)^2, up to 1 / eps for weights whose gradient is near or below eps, so the exact
  gradient carries large terms the first-order one lacks (docs/immunize.md: cosine 0.43 on a tiny model).
The inner steps never touch the real weights or their .grad: they run on a dict of tensors (torch.func).
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import argtypes
from ..training.data import collate
from ..training.steps import draw_noise_and_timesteps, encode_batch, mse
from .contrastive import CONTRASTIVE_OPTIONS, ContrastiveCentres, contrastive_config, ng_noise, safety_loss
from .method import HARMFUL_WEIGHT, DataBatch, Method, Option

INNER_OPTIMIZERS = ("adam", "sgd")
INNER_GRADS = ("first-order", "exact")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as attack.py's AdamW


@dataclass
class ImmunizeConfig:
    harmful_weight: float = -0.5  # w_h: the naive baseline's ascent on harmful rows (official "high safety")
    attack_weight: float = 1.0  # a: weight of the post-attack term
    cap: float = 1.0  # the post-attack MSE counts up to this, per row
    inner_steps: tuple = (1, 3)  # K drawn uniformly from this range (inclusive)
    inner_lr: tuple = (3e-5, 3e-4)  # drawn log-uniformly; around the miniature attack's 1e-4 (Adam)
    inner_batch: tuple = (1, 8)  # harmful rows per inner step, uniformly (inclusive)
    inner_optimizer: str = "adam"
    inner_grad: str = "first-order"

    def __post_init__(self):
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"immunize: unknown inner optimizer {self.inner_optimizer!r} ({INNER_OPTIMIZERS})")
        if self.inner_grad not in INNER_GRADS:
            raise ValueError(f"immunize: unknown inner gradient {self.inner_grad!r} ({INNER_GRADS})")
        for name in ("inner_steps", "inner_lr", "inner_batch"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name != "inner_steps" and low <= 0):
                raise ValueError(f"immunize: --{name.replace('_', '-')} {low},{high}: need 0 < low <= high "
                                 f"(steps: 0 <= low <= high)")


@dataclass
class SimulatedAttack:
    steps: int
    lr: float
    batch_size: int


def draw_attack(cfg: ImmunizeConfig, generator: torch.Generator) -> SimulatedAttack:
    """K, lr and the inner batch size from the run's generator (so a resumed run draws the same attacks)."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    k_lo, k_hi = cfg.inner_steps
    b_lo, b_hi = cfg.inner_batch
    lr_lo, lr_hi = cfg.inner_lr
    return SimulatedAttack(steps=k_lo + min(int(u[0] * (k_hi - k_lo + 1)), k_hi - k_lo),
                           lr=math.exp(math.log(lr_lo) + u[1] * (math.log(lr_hi) - math.log(lr_lo))),
                           batch_size=b_lo + min(int(u[2] * (b_hi - b_lo + 1)), b_hi - b_lo))


def draw_harmful_rows(harmful: torch.Tensor, batch_size: int, generator: torch.Generator) -> list:
    """batch_size harmful row indices of the dataset, drawn with replacement from the run's generator."""
    rows = torch.nonzero(harmful).flatten()
    if len(rows) == 0:
        raise ValueError("--method immunize simulates an attack on harmful rows: the data has none")
    return rows[torch.randint(0, len(rows), (batch_size,), generator=generator)].tolist()


def _inner_update(grads, state, step, lr, optimizer):
    """One SGD or Adam (zero initial moments, bias-corrected, no weight decay) update per tensor. Differentiable
    when the grads carry a graph. The Adam denominator's sqrt is clamped away from 0 so that its derivative stays
    finite (a weight with a zero gradient would otherwise give NaN in the exact gradient)."""
    if optimizer == "sgd":
        return [lr * g for g in grads]
    (b1, b2), updates = ADAM_BETAS, []
    for i, g in enumerate(grads):
        m, v = state.get(i, (0.0, 0.0))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        denom = (v / (1 - b2 ** step)).clamp_min(1e-30).sqrt() + ADAM_EPS
        updates.append(lr * (m / (1 - b1 ** step)) / denom)
    return updates


@contextlib.contextmanager
def _checkpointing(unet, on: bool):
    """unet.gradient_checkpointing set to `on` inside the context, restored after it."""
    before = unet.gradient_checkpointing
    unet.gradient_checkpointing = on
    try:
        yield
    finally:
        unet.gradient_checkpointing = before


def simulate_attack(unet, params: dict, batches: list, attack: SimulatedAttack, schedule, optimizer: str,
                    exact: bool):
    """phi_K from phi_0 = params after K plain fine-tuning steps, one per inner batch
    (x_t, t, context, added, x0, noise). exact: phi_K is a differentiable function of params; otherwise phi_K
    holds detached leaves. Returns (phi_K, the inner losses)."""
    names = list(params)
    phi = dict(params) if exact else {name: p.detach() for name, p in params.items()}
    state, losses = {}, []
    for k, (x_t, t, context, added, x0, noise) in enumerate(batches[:attack.steps], start=1):
        if not exact:
            phi = {name: p.requires_grad_(True) for name, p in phi.items()}
        # exact: this forward is differentiated twice; the fused attention kernels (flash, the CPU's) have no
        # double backward, the math one has. Gradient checkpointing is off for it: its recomputation would run
        # outside this context, with another kernel (checkpoint's metadata check refuses that).
        with sdpa_kernel(SDPBackend.MATH) if exact else contextlib.nullcontext(), \
                _checkpointing(unet, unet.gradient_checkpointing and not exact):
            pred = functional_call(unet, phi, (x_t, t, context), added)
        loss = mse(pred, schedule.target(x0, noise, t), per_row=True).mean()
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=exact, allow_unused=True)
        grads = [torch.zeros_like(phi[n]) if g is None else g for n, g in zip(names, grads)]
        with torch.set_grad_enabled(exact):
            updates = _inner_update(grads, state, k, attack.lr, optimizer)
            phi = {n: phi[n] - u for n, u in zip(names, updates)}
        if not exact:
            phi = {n: p.detach() for n, p in phi.items()}
        losses.append(loss.item())
    return phi, losses


def inner_batches(pipe, dataset, attack: SimulatedAttack, generator: torch.Generator) -> list:
    """The attacker's K batches, each of attack.batch_size harmful rows drawn with replacement, with their VAE
    samples, noise and t: (x_t, t, context, added, x0, noise), all from the run's generator. No flips."""
    batches = []
    for _ in range(attack.steps):
        rows = draw_harmful_rows(dataset.harmful, attack.batch_size, generator)
        batch = collate([dataset.load(i) for i in rows])
        x0, context, added = encode_batch(pipe, batch, generator)
        noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, generator)
        batches.append((pipe.schedule.add_noise(x0, noise, t), t, context, added, x0, noise))
    return batches


def immunize_loss(unet, pred, x_t, t, context, added, x0, noise, harmful, schedule, attack: SimulatedAttack,
                  inner: list, cfg: ImmunizeConfig, params: dict | None = None, base=None, x_t_attack=None):
    """The batch loss (module docstring) and a dict of floats for the log. pred: the UNet's output on the outer
    batch at the real weights (with their graph); params: the trained weights by name (default: every UNet
    parameter that requires grad); inner: the K batches the simulated attacker trains on (inner_batches).
    base: (loss, stats) of LT / NG's safety_loss on the same batch, which then replaces the naive part
    (--immunize-with); x_t_attack: the noisy latents the post-attack term is taken at, when pred's x_t are not
    the attacker's (NG's shifted noise; default x_t)."""
    harmful = harmful.to(pred.device, torch.bool)
    mse_rows = mse(pred, schedule.target(x0, noise, t), per_row=True)  # (B,)
    if base is None:
        total = (torch.where(harmful, cfg.harmful_weight, 1.0) * mse_rows).sum()
    else:
        total = base[0] * len(mse_rows)
    stats = {**(base[1] if base is not None else {}),
             "mse_clean": _masked_mean(mse_rows, ~harmful), "mse_harmful": _masked_mean(mse_rows, harmful),
             "inner_steps": 0, "inner_lr": attack.lr, "inner_batch": attack.batch_size,
             "inner_loss_first": 0.0, "inner_loss_last": 0.0, "attacked_mse": 0.0}
    if harmful.any() and cfg.attack_weight != 0:
        rows = harmful.nonzero().flatten()
        target = schedule.target(x0[rows], noise[rows], t[rows])
        inner_losses = []
        if attack.steps == 0 and x_t_attack is None:  # phi_K = theta: the outer prediction is the post-attack one
            after = mse(pred[rows], target, per_row=True)
            term = -cfg.attack_weight * after.clamp(max=cfg.cap).sum()
        else:
            if params is None:
                params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            exact = cfg.inner_grad == "exact"
            phi, inner_losses = simulate_attack(unet, params, inner, attack, schedule, cfg.inner_optimizer, exact)
            if not exact:
                phi = {n: p.requires_grad_(True) for n, p in phi.items()}
            at = x_t if x_t_attack is None else x_t_attack
            pred_after = functional_call(unet, phi, (at[rows], t[rows], context[rows]),
                                         {key: value[rows] for key, value in added.items()})
            after = mse(pred_after, target, per_row=True)
            term = -cfg.attack_weight * after.clamp(max=cfg.cap).sum()
            if not exact:  # first order: the term's gradient at phi_K, applied to theta; the value unchanged
                grads = torch.autograd.grad(term, list(phi.values()), allow_unused=True)
                surrogate = sum((params[n] * g).sum() for n, g in zip(phi, grads) if g is not None)
                term = term.detach() + surrogate - surrogate.detach()
        total = total + term
        stats.update(inner_steps=len(inner_losses), attacked_mse=after.mean().item(),
                     inner_loss_first=inner_losses[0] if inner_losses else 0.0,
                     inner_loss_last=inner_losses[-1] if inner_losses else 0.0)
    loss = total / len(mse_rows)
    return loss, {"loss": loss.item(), **stats}


def _masked_mean(values, mask) -> float:
    return values[mask].mean().item() if mask.any() else 0.0


@dataclass
class ImmunizeBatch(DataBatch):
    attack: SimulatedAttack = None  # drawn after the batch, from the same generator
    inner: list = None  # the simulated attacker's batches


class Immunize(Method):
    help = ("immunize: clean loss, ascent on harmful rows (--harmful-weight) and the harmful loss after a "
            "simulated attack made high (not in the paper)")
    options = (
        HARMFUL_WEIGHT,
        Option("--attack-weight", {"type": argtypes.finite_float, "default": 1.0,
                                   "help": "weight of the post-attack harmful MSE, subtracted from the loss"}),
        Option("--attack-cap", {"type": argtypes.positive_float, "default": 1.0,
                                "help": "the post-attack MSE counts up to this per row (1: a model that predicts 0)"}),
        Option("--inner-steps", {"type": argtypes.int_range, "default": "1,3",
                                 "help": "simulated attack steps K, drawn uniformly from LOW,HIGH each step"}),
        Option("--inner-lr", {"type": argtypes.positive_float_range, "default": "3e-5,3e-4",
                              "help": "the simulated attack's learning rate, drawn log-uniformly from LOW,HIGH"}),
        Option("--inner-batch-size", {"type": argtypes.positive_int_range, "default": "1,8",
                                      "help": "harmful rows per simulated attack step, drawn uniformly from LOW,HIGH"}),
        Option("--inner-optimizer", {"choices": INNER_OPTIMIZERS, "default": "adam",
                                     "help": "the simulated attacker's optimizer (Adam from zero moments, no weight "
                                             "decay)"}),
        Option("--inner-grad", {"choices": INNER_GRADS, "default": "first-order",
                                "help": "the post-attack term's gradient at the attacked weights, applied to the real "
                                        "ones, or exact (second order, through the inner steps; with the Adam "
                                        "attacker it does not agree with first-order: docs/immunize.md)"}),
        Option("--immunize-with", {"choices": ["lt", "ng"],
                                   "help": "LT's or NG's loss (with --lambda and the contrastive options) in place "
                                           "of the naive part, the post-attack term added (default: none, the "
                                           "naive ascent)"}),
        *CONTRASTIVE_OPTIONS,
    )
    default_preset = "immunize"
    distributed = False  # the simulated attack would run per rank on its rows; DDP hooks would all-reduce it

    @classmethod
    def check(cls, args):
        if args.lam and not args.immunize_with:
            raise ValueError(f"--lambda {args.lam}: --method immunize has no contrastive term (not combined with LT "
                             f"/ NG unless --immunize-with lt|ng); use --lambda 0 or --preset immunize")

    def __init__(self, args, pipe, dataset, generator, **setup):
        super().__init__(args, pipe, dataset, generator, **setup)
        self.config = ImmunizeConfig(
            harmful_weight=args.harmful_weight, attack_weight=args.attack_weight, cap=args.attack_cap,
            inner_steps=tuple(args.inner_steps), inner_lr=tuple(args.inner_lr),
            inner_batch=tuple(args.inner_batch_size), inner_optimizer=args.inner_optimizer, inner_grad=args.inner_grad)
        self.centres = None
        if args.immunize_with:  # LT / NG in place of the naive part
            self.contrastive = contrastive_config(args, args.immunize_with)
            size = pipe.unet.config.sample_size
            self.centres = ContrastiveCentres((pipe.unet.config.in_channels, size, size), generator)

    def noise_for_x_t(self, noise, harmful):
        return ng_noise(noise, harmful) if self.args.immunize_with == "ng" else noise

    def batch(self, index):
        batch = super().batch(index)
        attack = draw_attack(self.config, self.generator)
        inner = inner_batches(self.pipe, self.dataset, attack, self.generator) if batch.harmful.any() else []
        return ImmunizeBatch(**vars(batch), attack=attack, inner=inner)

    def loss(self, pred, b):
        schedule = self.pipe.schedule
        base = (safety_loss(pred, b.x_t, b.t, b.x0, b.noise, b.harmful, schedule, self.centres, self.contrastive)
                if self.centres else None)
        # NG's x_t is built from shifted noise; the attacker fine-tunes on plain x_t
        x_t_attack = schedule.add_noise(b.x0, b.noise, b.t) if self.args.immunize_with == "ng" else None
        with self.autocast():
            return immunize_loss(self.pipe.unet, pred, b.x_t, b.t, b.context, b.added, b.x0, b.noise, b.harmful,
                                 schedule, b.attack, b.inner, self.config, base=base, x_t_attack=x_t_attack)

    def state_dict(self) -> dict:
        return {key: value.clone() for key, value in self.centres.state_dict().items()} if self.centres else {}

    def load_state_dict(self, state: dict) -> None:
        if self.centres:
            self.centres.load_state_dict(state)
