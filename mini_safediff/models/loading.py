"""Loading a Stable Diffusion model (1.x, 2.x or XL) into a Pipeline: a diffusers folder or a single LDM file,
optionally with other UNet weights over it, strictly, and with the CPU speed-ups on the CPU.

    pipe = load_pipeline("path/to/stable-diffusion-v1-5")       # diffusers folder
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")     # single file
    pipe = load_pipeline("stable-diffusion-xl-base-1.0")        # SDXL: told apart by its second text encoder
    pipe = load_pipeline(base, unet="esd-unet.safetensors")     # safety reinforcement: safe UNet over a base
"""
import dataclasses
import json
from pathlib import Path

import torch

from . import cpu_speedups, ldm
from .clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .config import ConfigError, config_from_dict, read_config
from .pipeline import BUILTIN_MODEL, Pipeline, as_dtype
from .schedule import NoiseSchedule, SchedulerConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import WeightsError, build_model, find_weights, read_metadata, read_state_dict

# Keys that published files carry but that hold no weights of ours.
TEXT_KEYS_SAFE_TO_DROP = {"text_model.embeddings.position_ids"}


def text_state_dict(state_dict: dict) -> dict:
    """transformers 5 saves CLIPTextModel's keys without the `text_model.` prefix, published SD files with it
    (CLIPTextModelWithProjection's keep it, beside `text_projection.*`)."""
    state_dict = {key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
                  for key, value in state_dict.items()}
    return {key: value for key, value in state_dict.items() if key not in TEXT_KEYS_SAFE_TO_DROP}


def is_ldm_unet(state_dict: dict) -> bool:
    return any(key.startswith(("model.diffusion_model.", "diffusion_model.", "input_blocks.")) for key in state_dict)


def read_unet_override(path) -> dict:
    """UNet weights in either layout: a diffusers `unet/` folder or file, or LDM keys (full checkpoint or
    UNet only). Returns diffusers keys."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path / "unet" if (path / "unet").is_dir() else path)
    state_dict = read_state_dict(path)
    if not is_ldm_unet(state_dict):
        return state_dict
    prefix = next(p for p in ("model.diffusion_model.", "diffusion_model.", "") if any(k.startswith(p) for k in state_dict))
    unet_only = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return ldm.ldm_unet_to_diffusers(unet_only)


def _sdxl_parts(path: Path, dtype) -> dict:
    """text_encoder_2, tokenizer_2 and force_zeros_for_empty_prompt of an SDXL folder ({} without text_encoder_2/)."""
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    if not (path / "text_encoder_2").is_dir():
        if "XL" in index.get("_class_name", ""):
            raise WeightsError(f"{path}: model_index.json names {index['_class_name']}, but there is no "
                               "text_encoder_2/ subfolder")
        return {}
    text_file = find_weights(path / "text_encoder_2")
    return {"text_encoder_2": build_model(CLIPTextModelWithProjection,
                                          read_config(path / "text_encoder_2" / "config.json", CLIPTextConfig),
                                          text_state_dict(read_state_dict(text_file)), str(text_file), dtype),
            "tokenizer_2": CLIPTokenizer.from_folder(path / "tokenizer_2") if (path / "tokenizer_2").is_dir()
            else CLIPTokenizer.default(pad_token="!"),
            "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}


def _load_folder(path: Path, dtype) -> Pipeline:
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        if not (path / part).is_dir():
            raise WeightsError(f"{path}: not a diffusers Stable Diffusion folder (no {part}/ subfolder)")
    unet_folder, vae_folder, text_folder = path / "unet", path / "vae", path / "text_encoder"
    text_config = read_config(text_folder / "config.json", CLIPTextConfig)
    if (path / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_folder(path / "tokenizer")
    else:  # SD 2 (OpenCLIP, gelu) pads with "!", SD 1 with <|endoftext|>
        tokenizer = CLIPTokenizer.default(pad_token="!" if text_config.hidden_act == "gelu" else "<|endoftext|>")
    unet_file, vae_file, text_file = find_weights(unet_folder), find_weights(vae_folder), find_weights(text_folder)
    return Pipeline(
        unet=build_model(UNet2DConditionModel, read_config(unet_folder / "config.json", UNetConfig),
                    read_state_dict(unet_file), str(unet_file), dtype),
        vae=build_model(AutoencoderKL, read_config(vae_folder / "config.json", VAEConfig),
                   read_state_dict(vae_file), str(vae_file), dtype),
        text_encoder=build_model(CLIPTextModel, text_config, text_state_dict(read_state_dict(text_file)),
                            str(text_file), dtype),
        tokenizer=tokenizer,
        schedule=NoiseSchedule(read_config(path / "scheduler" / "scheduler_config.json", SchedulerConfig)),
        **_sdxl_parts(path, dtype))


def _load_single_file(path: Path, dtype, prediction_type) -> Pipeline:
    source = str(path)
    metadata = read_metadata(path)
    try:
        parts = ldm.ldm_to_diffusers(read_state_dict(path),
                                     prediction_type=prediction_type or metadata.get("prediction_type"))
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None

    def config(part, config_class):  # our own files carry the exact config; others get it from shapes
        key, raw = f"{part}_config", parts[part][1]
        if key in metadata:
            try:
                raw = json.loads(metadata[key])
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: metadata {key!r} is not valid JSON ({e})") from None
        return config_from_dict(config_class, raw, f"{source} ({part} config)")

    return Pipeline(
        unet=build_model(UNet2DConditionModel, config("unet", UNetConfig), parts["unet"][0], f"{source} (UNet)", dtype),
        vae=build_model(AutoencoderKL, config("vae", VAEConfig), parts["vae"][0], f"{source} (VAE)", dtype),
        text_encoder=build_model(CLIPTextModel, config("text_encoder", CLIPTextConfig),
                                 text_state_dict(parts["text_encoder"][0]), f"{source} (text encoder)", dtype),
        tokenizer=CLIPTokenizer.default(pad_token=parts["tokenizer_pad_token"]),
        schedule=NoiseSchedule(config_from_dict(SchedulerConfig, parts["scheduler"], source)),
        **({"text_encoder_2": build_model(CLIPTextModelWithProjection, config("text_encoder_2", CLIPTextConfig),
                                          parts["text_encoder_2"][0], f"{source} (text encoder 2)", dtype),
            "tokenizer_2": CLIPTokenizer.default(pad_token=parts["tokenizer_2_pad_token"])}
           if "text_encoder_2" in parts else {}))


def load_pipeline(path=None, device=None, dtype=None, unet=None, prediction_type=None) -> Pipeline:
    """Load a diffusers folder or a single `.safetensors`/`.ckpt` file (path None: the built-in tiny model,
    BUILTIN_MODEL, from any working folder).

    unet: optional UNet weights (folder or file, diffusers or LDM keys) loaded over the base model,
        e.g. an erased "safe" UNet for safety reinforcement.
    prediction_type: "epsilon" or "v_prediction"; overrides the scheduler config (needed for single
        files of v-models such as SD 2.x 768, which the weights cannot reveal).
    device: defaults to CUDA when available. dtype: defaults to float32; a torch dtype or its name ("float16").
    """
    path = Path(BUILTIN_MODEL if path is None else path)
    dtype = as_dtype(dtype) or torch.float32
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if path.is_dir():
        pipe = _load_folder(path, dtype)
        if prediction_type:
            pipe.schedule = NoiseSchedule(dataclasses.replace(pipe.schedule.config, prediction_type=prediction_type))
    elif path.is_file():
        pipe = _load_single_file(path, dtype, prediction_type)
    else:
        raise WeightsError(f"{path}: no such model folder or file")
    if unet is not None:
        pipe.unet = build_model(UNet2DConditionModel, pipe.unet.config, read_unet_override(unet),
                           f"{unet} (UNet override)", dtype)
    pipe.to(device)
    if pipe.device.type == "cpu":
        cpu_speedups.apply(pipe.unet, pipe.vae)
    return pipe
