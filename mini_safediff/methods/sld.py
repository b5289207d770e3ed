"""Safe Latent Diffusion (Schramowski et al., CVPR 2023): steer sampling away from a safety concept given as
text, with no change to the weights. At each step, besides the unconditional and the prompt's prediction, the
UNet predicts for the safety concept; with g the guidance scale:

  d_s    = eps_text - eps_concept
  mu     = 0 where d_s >= threshold, else min(1, s_s |d_s|)          (eq. 6, elementwise)
  gamma  = mu (eps_concept - eps_uncond) + s_m nu                    (eqs. 4, 7)
  nu    <- beta_m nu + (1 - beta_m) gamma                            (eq. 8, every step, nu_0 = 0)
  eps    = eps_uncond + g (eps_text - eps_uncond - gamma)            (eq. 3, from step warmup_steps on;
           plain classifier-free guidance before)

As in diffusers' StableDiffusionPipelineSafe, SLD runs only with classifier-free guidance (g > 1) and
s_s > 1; it works on whatever the UNet predicts (eps or v). The presets are the paper's (table 1), the same
as diffusers' SafetyConfig.
"""
from dataclasses import dataclass, fields

import torch

# The default safety concept of the paper and of diffusers' pipeline: I2P's categories in words.
DEFAULT_SAFETY_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
                          "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
                          "theft, vandalism, weapons, child abuse, brutality, cruelty")


@dataclass(frozen=True)
class SLDConfig:
    """The five hyperparameters, named as diffusers' `sld_*` arguments without the prefix; the defaults are
    diffusers' (the medium preset)."""
    warmup_steps: int = 10  # delta: steps of plain guidance before the safety term applies
    guidance_scale: float = 1000  # s_s: how fast mu saturates at 1
    threshold: float = 0.01  # lambda: where d_s is at least this, the element is left alone
    momentum_scale: float = 0.3  # s_m
    mom_beta: float = 0.4  # beta_m

    @property
    def enabled(self) -> bool:
        return self.guidance_scale > 1


SLD_PRESETS = {
    "weak": SLDConfig(warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0, mom_beta=0.0),
    "medium": SLDConfig(warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3, mom_beta=0.4),
    "strong": SLDConfig(warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5, mom_beta=0.7),
    "max": SLDConfig(warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5, mom_beta=0.7),
}


def sld_config(setting) -> SLDConfig | None:
    """None (no SLD), a preset name, an SLDConfig, or a dict of some of its five keys with or without diffusers'
    `sld_` prefix (the others keep diffusers' defaults): unknown keys and names are refused by name."""
    if setting is None or isinstance(setting, SLDConfig):
        return setting
    if isinstance(setting, str):
        if setting not in SLD_PRESETS:
            raise ValueError(f"safety guidance {setting!r}: choose a preset ({', '.join(SLD_PRESETS)}) or give a "
                             "dict of its settings")
        return SLD_PRESETS[setting]
    if not isinstance(setting, dict):
        raise ValueError(f"safety guidance must be None, a preset name or a dict, got {type(setting).__name__}")
    names = [field.name for field in fields(SLDConfig)]
    values = {}
    for key, value in setting.items():
        name = key.removeprefix("sld_") if isinstance(key, str) else key
        if name not in names:
            raise ValueError(f"safety guidance: unknown setting {key!r} (known: {', '.join(names)}, with or "
                             "without the sld_ prefix)")
        if name in values:
            raise ValueError(f"safety guidance: {name} is given twice")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"safety guidance: {key} must be a number, got {value!r}")
        values[name] = value
    return SLDConfig(**values)


def sld_hook(setting, concept: str | None = None):
    """Pipeline.generate's guidance_hook for an SLD setting (sld_config's) steering away from `concept`
    (default: SLD's own concept text); None for no setting. As in diffusers, SLD runs only with classifier-free
    guidance above 1 and a safety scale above 1: otherwise the hook leaves sampling plain."""
    config = sld_config(setting)
    if config is None:
        if concept is not None:
            raise ValueError("safety_concept is the concept of safety_guidance, which is not set")
        return None

    def hook(prompts: list, guidance: float):
        if not config.enabled or guidance <= 1:
            return None
        return [concept or DEFAULT_SAFETY_CONCEPT] * len(prompts), SafeLatentGuidance(config, guidance)
    return hook


def sld_row(setting, concept: str | None) -> dict:
    """What a results row records of SLD: the setting and the concept of a row sampled with it ({} without)."""
    if setting is None:
        return {}
    return {"safety_guidance": setting, "safety_concept": concept or DEFAULT_SAFETY_CONCEPT}


class SafeLatentGuidance:
    """SLD's guidance for one batch of images: called once per sampler step, in order, it keeps the step count
    and the momentum nu."""

    def __init__(self, config: SLDConfig, guidance: float):
        self.config, self.guidance = config, guidance
        self.step = 0
        self.momentum = None

    def __call__(self, uncond: torch.Tensor, text: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        c = self.config
        direction = text - uncond
        if self.momentum is None:
            self.momentum = torch.zeros_like(direction)
        difference = text - concept
        scale = (difference.abs() * c.guidance_scale).clamp(max=1.0)
        scale = torch.where(difference >= c.threshold, torch.zeros_like(scale), scale)
        safety = (concept - uncond) * scale + c.momentum_scale * self.momentum
        self.momentum = c.mom_beta * self.momentum + (1 - c.mom_beta) * safety
        if self.step >= c.warmup_steps:
            direction = direction - safety
        self.step += 1
        return uncond + self.guidance * direction
