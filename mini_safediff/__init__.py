"""mini_safediff: a minimal, from-scratch PyTorch reference implementation of
"Leveraging Catastrophic Forgetting to Develop Safe Diffusion Models against Malicious Finetuning"
(Pan et al., NeurIPS 2024), with hand-written Stable Diffusion 1.x / 2.x components."""
from .clip import CLIPTextConfig, CLIPTextModel
from .pipeline import Pipeline, load_pipeline
from .schedule import NoiseSchedule, SchedulerConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import WeightsError

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "NoiseSchedule", "Pipeline",
           "SchedulerConfig", "UNet2DConditionModel", "UNetConfig", "VAEConfig", "WeightsError", "load_pipeline"]
