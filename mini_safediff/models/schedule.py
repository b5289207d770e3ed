"""The DDPM noise schedule of Stable Diffusion (Ho et al. 2020), read from scheduler/scheduler_config.json.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar_t = prod_{s<=t} (1 - beta_s).
The model predicts either eps ("epsilon", SD 1.x, SD 2.x 512) or v = sqrt(abar) eps - sqrt(1 - abar) x0
("v_prediction", SD 2.x 768; Salimans & Ho 2022). Betas are float32, as diffusers builds them.
"""
import dataclasses
from dataclasses import dataclass

import torch

from .config import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' DDIMScheduler defaults that differ from our behaviour, written into saved configs.
DDIM_FIXED = {"clip_sample": False, "thresholding": False, "trained_betas": None, "rescale_betas_zero_snr": False}


@dataclass
class SchedulerConfig:
    """The options of the SD scheduler configs (PNDM, DDIM, DDPM, Euler, LMS, DPM-Solver classes).
    Defaults are SD's published values. The config's class does not matter: the samplers are chosen
    at generation time. A missing timestep_spacing (None) means each sampler's own default, as diffusers
    reads SD's published configs (which lack the key): "leading" for DDIM, "linspace" for DPM-Solver."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM's last step lands on abar = 1 (True) or on abar_0 (False)
    timestep_spacing: str | None = None

    FIXED = {
        **DDIM_FIXED,
        # Learned variances would come as extra model output channels; the fixed ones only matter to DDPM sampling.
        "variance_type": [None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],
        "timestep_type": "discrete",
        # DPM-Solver++(2M) exactly: other solvers, orders and sigma spacings are not implemented.
        "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "use_dynamic_shifting": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
    }
    # Options of other samplers, or of behaviour switched off above: they change nothing here.
    # (With order 2 and a zero final sigma the last DPM step is first order whatever the last two say.)
    IGNORED = {"skip_prk_steps", "clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio",
               "interpolation_type", "sigma_min", "sigma_max", "flow_shift", "time_shift_type",
               "lower_order_final", "euler_at_final"}

    def __post_init__(self):
        for key, allowed in [("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                             ("timestep_spacing", TIMESTEP_SPACINGS)]:
            value = getattr(self, key)
            if value not in allowed and not (key == "timestep_spacing" and value is None):
                raise ConfigError(f"scheduler config: option {key!r} = {value!r} is not supported "
                                  f"(supported: {', '.join(repr(a) for a in allowed)})")
        if not self.beta_start < self.beta_end:  # betas grow along the forward process
            raise ConfigError(f"scheduler config: beta_start = {self.beta_start} is not below "
                              f"beta_end = {self.beta_end}")

    def to_dict(self) -> dict:
        """The keys of a diffusers DDIMScheduler config (clip_sample is True by default there)."""
        config = {**dataclasses.asdict(self), **DDIM_FIXED}
        if self.timestep_spacing is None:  # absent, so that each sampler class keeps its own default
            del config["timestep_spacing"]
        return config


class NoiseSchedule:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":  # LDM: linear in sqrt(beta)
            self.betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n,
                                        dtype=torch.float32) ** 2
        else:
            self.betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        """sqrt(abar_t), sqrt(1 - abar_t) shaped (B, 1, 1, 1) (or (1, 1, 1, 1) for a 0-dim t) in like's dtype."""
        self.alphas_cumprod = self.alphas_cumprod.to(like.device)  # moved once, kept there for later calls
        abar = self.alphas_cumprod[t.to(like.device)].to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))
        return abar ** 0.5, (1 - abar) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0) (DDPM eq. 4), t a LongTensor (B,)."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict at x_t = add_noise(x0, noise, t)."""
        if self.config.prediction_type == "epsilon":
            return noise
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x_t)
        if self.config.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    def predict_eps(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return model_output
        a, s = self._coefficients(t, x_t)
        return a * model_output + s * x_t
