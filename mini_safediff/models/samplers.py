"""Samplers over a model function `model_fn(x, t) -> model_output` (eps or v, as the schedule says),
t a 0-dim int64 tensor on x's device. Both start from unscaled N(0, I) latents and reproduce
diffusers' DDIMScheduler and DPMSolverMultistepScheduler step for step.
"""
import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule


def timesteps(schedule: NoiseSchedule, steps: int, skip_last: bool = False) -> list[int]:
    """The sampling timesteps, high to low, as diffusers' set_timesteps spaces them (Lin et al. 2023,
    table 2). DPM-Solver (skip_last=True) spaces steps + 1 points and drops the lowest: its last step
    goes to sigma = 0 instead."""
    config = schedule.config
    n_train = config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {steps}")
    points = steps + skip_last
    spacing = config.timestep_spacing or ("linspace" if skip_last else "leading")  # diffusers' class defaults
    if spacing == "leading":
        ts = np.arange(points)[::-1] * (n_train // points) + config.steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, n_train - 1, points).round()[::-1]
    else:  # trailing
        ts = np.round(np.arange(n_train, 0, -n_train / steps)) - 1
    # [:steps]: for some step counts (61, 103, ...) float arange yields one more point, t = -1, which
    # diffusers keeps (and then reads abar[-1]); we drop it.
    ts = ts.astype(np.int64)[:steps]
    if ts[0] >= n_train:  # "leading" with steps_offset 1 at steps = n_train: diffusers reads past the schedule
        raise ValueError(f"steps {steps} would start at t = {ts[0]}, past the schedule's {n_train} timesteps "
                         f"({spacing} spacing, steps_offset {config.steps_offset}): use fewer steps")
    return ts.tolist()


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """As diffusers' randn_tensor: drawn on the generator's device (a CPU generator gives the same noise
    on every device), then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddim(model_fn, latents: torch.Tensor, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
         generator=None, progress: bool = True, stop_after: int | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021). eta = 0: deterministic; eta = 1: the DDPM posterior variance.
    stop_after: return after this many of the `steps` steps, still noisy (ESD's partial sampling)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = timesteps(schedule, steps)
    abar = schedule.alphas_cumprod.cpu()
    final_abar = torch.tensor(1.0) if schedule.config.set_alpha_to_one else abar[0]
    stride = schedule.config.num_train_timesteps // steps  # diffusers steps back by this for every spacing
    x = latents
    for t in tqdm(ts[:stop_after], disable=not progress, desc="sampling (DDIM)", leave=False):
        t_device = torch.tensor(t, device=x.device)
        out = model_fn(x, t_device)
        x0, eps = schedule.predict_x0(x, out, t_device), schedule.predict_eps(x, out, t_device)
        a_t = abar[t]
        a_prev = abar[t - stride] if t >= stride else final_abar
        # DDIM eq. 16: sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # DDIM eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn_like(out, generator)
    return x


@torch.no_grad()
def dpmpp_2m(model_fn, latents: torch.Tensor, schedule: NoiseSchedule, steps: int,
             generator=None, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022: a multistep second-order solver of the diffusion
    ODE in the data prediction x0 and the log-SNR lambda = log(alpha / sigma). The first step is first
    order (no history yet). The last step goes to sigma = 0 (lambda = inf), where the update is x0
    itself. Deterministic: `generator` is accepted for a sampler-independent call signature."""
    ts = timesteps(schedule, steps, skip_last=True)
    abar = schedule.alphas_cumprod.cpu()
    alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
    lam = alpha.log() - sigma.log()
    x = latents
    x0_prev = h_prev = None
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="sampling (DPM++ 2M)", leave=False)):
        t_device = torch.tensor(t, device=x.device)
        out = model_fn(x, t_device)
        x0 = schedule.predict_x0(x, out, t_device)
        if i == len(ts) - 1:
            return x0
        s, t_next = t, ts[i + 1]
        h = lam[t_next] - lam[s]
        # Algorithm 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * h_prev / h)
        # x_{i+1} = sigma_{i+1} / sigma_i x_i - alpha_{i+1} (e^{-h} - 1) D, updated in float32 as diffusers does
        x = (sigma[t_next] / sigma[s] * x.float() - alpha[t_next] * torch.expm1(-h) * d).to(out.dtype)
        x0_prev, h_prev = x0, h
