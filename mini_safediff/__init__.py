"""mini_safediff: a minimal, from-scratch PyTorch reference implementation of
"Leveraging Catastrophic Forgetting to Develop Safe Diffusion Models against Malicious Finetuning"
(Pan et al., NeurIPS 2024), with hand-written Stable Diffusion 1.x / 2.x / XL components."""
from .models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .models.loading import load_pipeline
from .models.pipeline import BUILTIN_MODEL, Pipeline
from .models.schedule import NoiseSchedule, SchedulerConfig
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .models.weights import WeightsError

__all__ = ["BUILTIN_MODEL", "AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
           "NoiseSchedule", "Pipeline", "SchedulerConfig", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
           "WeightsError", "load_pipeline"]
