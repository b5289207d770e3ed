"""Tiny random Stable Diffusion pipelines built with the reference libraries (diffusers,
transformers), saved in the diffusers layout: the oracle side of the parity tests. Each function imports its
oracle when called, so a test that uses one skips when the oracle is not installed (tests/oracles.py)."""
import json
from pathlib import Path

import numpy as np
import torch
from builders import SDXL_SCALING_FACTOR, TINY_TEXT, TINY_TEXT_2, TINY_UNET, TINY_VAE
from oracles import oracle

from sd_configs import SD_SCHEDULER, SDXL_SCHEDULER

TOKENIZER_FILES = Path(__file__).resolve().parent.parent / "mini_safediff" / "models" / "tokenizer_data"


def reference_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer on the shipped vocabulary; SD 1 pads with <|endoftext|>, SD 2 with "!"."""
    return oracle("transformers").CLIPTokenizer(str(TOKENIZER_FILES / "vocab.json"),
                                                str(TOKENIZER_FILES / "merges.txt"), pad_token=pad_token,
                                                model_max_length=77)


def reference_ddim(prediction_type: str = "epsilon"):
    """diffusers' DDIMScheduler as SD's scheduler_config.json sets it up."""
    return oracle("diffusers").DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                             prediction_type=prediction_type)


def diffusers_pipeline(kind: str = "sd1", prediction_type: str = "epsilon", seed: int = 0):
    """A random tiny diffusers StableDiffusionPipeline of SD1 (quick_gelu, pad <|endoftext|>) or SD2
    (gelu, linear projections, per-block heads, upcast attention, pad "!") style, or StableDiffusionXLPipeline."""
    if kind == "sdxl":
        return diffusers_sdxl_pipeline(prediction_type, seed)
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET[kind])
    vae = diffusers.AutoencoderKL(**TINY_VAE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **TINY_TEXT, hidden_act="quick_gelu" if kind == "sd1" else "gelu"))
    for model in (unet, vae, text_encoder):  # no zero-initialised layer may hide a wrong connection
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.eval()
    return diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=reference_tokenizer("<|endoftext|>" if kind == "sd1" else "!"),
                                   scheduler=reference_ddim(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def diffusers_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A random tiny diffusers StableDiffusionXLPipeline: CLIP-L-like first encoder padding with <|endoftext|>,
    OpenCLIP-like second with its projection padding with "!", the VAE scaled by SDXL's factor."""
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    torch.manual_seed(seed)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_TEXT_2))
    unet = diffusers.UNet2DConditionModel(**TINY_UNET["sdxl"])
    vae = diffusers.AutoencoderKL(**TINY_VAE, scaling_factor=SDXL_SCALING_FACTOR)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT, hidden_act="quick_gelu"))
    for model in (unet, vae, text_encoder, text_encoder_2):  # no zero-initialised layer may hide a wrong connection
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.eval()
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=reference_tokenizer(),
        tokenizer_2=reference_tokenizer("!"), unet=unet, scheduler=reference_ddim(prediction_type),
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def saved_diffusers_pipeline(folder: Path, kind: str = "sd1", prediction_type: str = "epsilon"):
    """Saved with the scheduler config that SD 1.5 publishes (PNDM, no timestep_spacing key, which
    each sampler class then fills with its own default), or SDXL base's (Euler, "leading" spacing); the
    returned pipeline reads it back."""
    pipe = diffusers_pipeline(kind, prediction_type)
    pipe.save_pretrained(folder)
    scheduler = SDXL_SCHEDULER if kind == "sdxl" else SD_SCHEDULER
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "prediction_type": prediction_type}))
    scheduler_class = getattr(oracle("diffusers"), scheduler["_class_name"])
    pipe.scheduler = scheduler_class.from_pretrained(folder / "scheduler")
    return pipe


# A tiny random transformers CLIPModel (text + vision towers) for the CLIP scorers' parity tests.
BOS, EOS = 49406, 49407
TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
VISION = dict(hidden_size=24, intermediate_size=40, num_attention_heads=3, num_hidden_layers=2, image_size=30,
              patch_size=6)
PROCESSOR = dict(size={"shortest_edge": 34}, crop_size={"height": 30, "width": 30})  # crops both sides


def save_reference(folder, eos_token_id=EOS, hidden_act="quick_gelu"):
    """A random tiny transformers CLIPModel, its image processor and tokenizer, saved with save_pretrained."""
    transformers = oracle("transformers")
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id, "hidden_act": hidden_act},
                                     vision_config={**VISION, "hidden_act": hidden_act}, projection_dim=16))
    with torch.no_grad():  # move every weight off its initial value (layer norms start at 1 and 0)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(**PROCESSOR)
    processor.save_pretrained(folder)
    reference_tokenizer().save_pretrained(folder)
    return ref, processor


def sample_images(seed=0) -> list:
    """Smooth colour fields with noise, in landscape, portrait, square and smaller-than-the-model sizes (odd
    margins exercise the centre crop's rounding, the small one bicubic upsampling)."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in [(45, 55), (70, 33), (34, 34), (20, 25)]:
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        smooth = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1) * 100 + 128
        images.append(np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def assert_same_weights(ours: torch.nn.Module, ref: torch.nn.Module):
    """Our module and the reference library's hold the same tensors under the same keys."""
    from mini_safediff.models.loading import text_state_dict

    ours, ref = ours.state_dict(), ref.state_dict()
    if "text_model.final_layer_norm.weight" in ours:  # transformers 5 drops CLIPTextModel's `text_model.` level
        ref = text_state_dict(ref)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
