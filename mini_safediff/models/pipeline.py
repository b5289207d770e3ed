"""A Stable Diffusion model (1.x, 2.x or XL) as one object: encode prompts, generate images, save it back in
either layout (loading: loading.py).

    images = pipe.generate(["a photo of a cat"], seed=0)        # uint8 (N, H, W, 3)
    image = pipe("a photo of a cat", num_inference_steps=50, guidance_scale=7.5).images[0]   # as diffusers: PIL
    pipe.save("out/model")                                      # diffusers layout
    pipe.save("out/model.safetensors")                          # one LDM single file
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_folder, write_json
from . import ldm, samplers
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .config import config_to_dict
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL
from .weights import save_state_dict

# The built-in tiny model (diffusers layout) that every script uses when no --model is given.
BUILTIN_MODEL = Path(__file__).resolve().parents[2] / "weights"
# Sampling defaults of generate, sample and evaluate.py for real models (the miniature has its own).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
SAMPLERS = {"ddim": samplers.ddim, "dpmpp-2m": samplers.dpmpp_2m}
# VAE decoding of a batch goes in slices of this many output pixels (4 images at 512x512).
DECODE_SLICE_PIXELS = 2**20


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def as_dtype(dtype) -> torch.dtype | None:
    """A torch dtype, or its name as people type it ("float16", "torch.float16", "fp16", "bf16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class PipelineOutput:
    """What calling a Pipeline returns, as diffusers' StableDiffusionPipelineOutput: `.images`, PIL images."""
    images: list


def start_noise(shape, seeds) -> torch.Tensor:
    """The starting latents of generation, (len(seeds), *shape): image i's from seed seeds[i], drawn on the CPU so
    that a seed gives the same image on every device and in every batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class Pipeline:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    # SDXL only: OpenCLIP ViT-bigG and its tokenizer (pads with "!").
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL: without a negative prompt the unconditional branch gets zero embeddings, not the empty prompt's
    # (diffusers' StableDiffusionXLPipeline option, in model_index.json; True by default and in SDXL base).
    force_zeros_for_empty_prompt: bool = True

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, *device_or_dtype, device=None, dtype=None) -> "Pipeline":
        """As diffusers': pipe.to("cuda"), pipe.to(torch.float16), pipe.to("cpu", "bfloat16"), or by keyword."""
        for value in device_or_dtype:
            if isinstance(value, torch.dtype) or str(value).removeprefix("torch.") in {**DTYPES, **DTYPE_ALIASES}:
                dtype = value
            else:
                device = value
        dtype = as_dtype(dtype)
        for model in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if model is not None:
                model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The context the UNet cross-attends to, (B, 77, D): SD 1 / 2: the text encoder's last hidden state;
        SDXL: both encoders' penultimate hidden states side by side (768 + 1280 = 2048 features)."""
        return self.encode_text(prompts)[0]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (B, 77, D), pooled): pooled is SDXL's second encoder's projected pooled output (B, 1280),
        None for SD 1 / 2. Each distinct prompt is encoded once: batches often repeat one (several images per
        prompt, the same negative prompt for every image)."""
        rows = {}
        index = [rows.setdefault(prompt, len(rows)) for prompt in prompts]  # prompt -> its row among the distinct
        ids = self.tokenizer(list(rows)).to(self.device)
        if self.is_sdxl:
            first = self.text_encoder.text_model.hidden_states(ids)[0]
            second, pooled = self.text_encoder_2(self.tokenizer_2(list(rows)).to(self.device))
            hidden = torch.cat([first, second], dim=-1)
        else:
            hidden, pooled = self.text_encoder(ids), None
        if len(rows) == len(prompts):
            return hidden, pooled
        return hidden[index], None if pooled is None else pooled[index]

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """SDXL's size conditioning (B, 6) as diffusers' pipeline and training script set it by default: the
        original size and the target size both (height, width) in pixels, the crop's top-left corner (0, 0)."""
        return torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype).repeat(
            batch, 1)

    def conditioning(self, prompts: list[str], height: int, width: int) -> tuple[torch.Tensor, dict]:
        """(context, added): what the UNet takes besides the latents and timesteps, as
        `unet(x, t, context, **added)`; added is {} for SD 1 / 2, SDXL's text_embeds and time_ids for images of
        height x width pixels."""
        context, pooled = self.encode_text(prompts)
        if pooled is None:
            return context, {}
        return context, {"text_embeds": pooled, "time_ids": self.time_ids(height, width, len(pooled))}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def __call__(self, prompt, negative_prompt=None, num_inference_steps=DEFAULT_STEPS,
                 guidance_scale=DEFAULT_GUIDANCE, num_images_per_prompt=1, height=None, width=None, seed=None,
                 output_type="pil", **generate_options) -> PipelineOutput:
        """diffusers' call: a prompt or a list of them -> `.images`, PIL images ("pil") or uint8 arrays ("np");
        image i of the flattened list is seeded `seed + i` as in generate (seed None: a random one). Any other
        keyword is generate's (sampler, eta, batch_size, latents, guidance_hook, progress)."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type {output_type!r}: choose pil or np")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, (list, tuple)):
            negative_prompt = [text for text in negative_prompt for _ in range(num_images_per_prompt)]
        images = self.generate([text for text in prompts for _ in range(num_images_per_prompt)],
                               negative_prompt=negative_prompt, steps=num_inference_steps, guidance=guidance_scale,
                               seed=seed, height=height, width=width, **generate_options)
        return PipelineOutput([Image.fromarray(image) for image in images] if output_type == "pil" else list(images))

    @torch.no_grad()
    def generate(self, prompts, negative_prompt=None, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=None,
                 height=None, width=None, latents=None, sampler="ddim", eta=0.0, batch_size=None, return_latents=False,
                 progress=True, guidance_hook=None):
        """Text to image with classifier-free guidance. Returns uint8 images (N, H, W, 3), or the final
        latents (N, C, h, w) with return_latents=True.

        guidance_hook (SD 1 / 2 only): a third UNet branch and how to combine it, for guidance that steers
        sampling (Safe Latent Diffusion: methods/sld.py's sld_hook). Called once per batch as
        `hook(prompts, guidance)`, it returns None (plain guidance) or (texts, combine): one extra text per prompt,
        and `combine(uncond, cond, extra)`, the guided prediction, called at every sampler step in order (so it
        may keep state across the steps of its batch).

        Image i starts from noise seeded with `seed + i`, so an image does not depend on the batch it
        was made in (evaluation can resume or split prompt lists freely)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt or ""] * len(prompts)
        zero_negatives = negative_prompt is None and self.is_sdxl and self.force_zeros_for_empty_prompt
        factor = self.vae_scale_factor
        height = height or self.unet.config.sample_size * factor
        width = width or self.unet.config.sample_size * factor
        if not prompts:
            raise ValueError("generate: the prompt list is empty")
        if len(negatives) != len(prompts):
            raise ValueError(f"generate: {len(negatives)} negative prompts for {len(prompts)} prompts")
        if height % factor or width % factor:
            raise ValueError(f"generate: height and width must be divisible by {factor}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"generate: steps must be >= 1, got {steps}")
        if guidance < 0:
            raise ValueError(f"generate: guidance must be >= 0, got {guidance}")
        if sampler not in SAMPLERS:
            raise ValueError(f"generate: unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        if guidance_hook is not None and self.is_sdxl:
            raise ValueError("generate: guidance_hook is implemented for SD 1 / 2, not SDXL")
        if seed is None:
            seed = int(torch.randint(0, 2**31, ()).item())
        shape = (self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = start_noise(shape, range(seed, seed + len(prompts)))
        elif latents.shape != (len(prompts), *shape):
            raise ValueError(f"generate: latents of shape {tuple(latents.shape)}, expected {(len(prompts), *shape)}")
        batch_size = batch_size or len(prompts)
        results = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            generator = torch.Generator().manual_seed(seed + start)  # DDIM eta > 0 noise
            model_fn = self.guided_model(prompts[start:end], None if zero_negatives else negatives[start:end],
                                         guidance, height, width, guidance_hook)
            final = SAMPLERS[sampler](model_fn,
                                      latents[start:end].to(self.device, self.dtype), self.schedule, steps,
                                      generator=generator, progress=progress,
                                      **({"eta": eta} if sampler == "ddim" else {}))
            results.append(final if return_latents else self.decode_to_uint8(final))
        return torch.cat(results) if return_latents else np.concatenate(results)

    def guided_model(self, prompts: list, negatives: list | None, guidance: float, height: int, width: int,
                     hook=None):
        """The model function `model_fn(x, t)` the samplers call: the UNet with classifier-free guidance (as in
        diffusers, only when guidance > 1), all branches in one batched call, their texts encoded in one encoder
        call. negatives None: zero embeddings for the unconditional branch (SDXL's force_zeros_for_empty_prompt).
        hook: generate's guidance_hook, a third branch."""
        guided = guidance > 1
        branch = hook(prompts, guidance) if hook else None
        extra, combine = branch if branch else ([], None)
        if branch and not guided:
            raise ValueError(f"guidance_hook: a third branch needs classifier-free guidance (> 1), got {guidance}")
        if branch and len(extra) != len(prompts):
            raise ValueError(f"guidance_hook: {len(extra)} texts for {len(prompts)} prompts")
        encoded = (list(negatives) if guided and negatives is not None else []) + list(prompts) + list(extra)
        context, added = self.conditioning(encoded, height, width)  # unconditional first
        if guided and negatives is None:
            context = torch.cat([torch.zeros_like(context), context])
            added["text_embeds"] = torch.cat([torch.zeros_like(added["text_embeds"]), added["text_embeds"]])
            added["time_ids"] = added["time_ids"].repeat(2, 1)

        branches = 3 if branch else 2 if guided else 1

        def model_fn(x, t):
            out = self.unet(torch.cat([x] * branches), t, context, **added)
            if branch:
                return combine(*out.chunk(3))
            if not guided:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + guidance * (out_cond - out_uncond)
        return model_fn

    @torch.no_grad()
    def decode_to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Decoded in slices of about DECODE_SLICE_PIXELS output pixels: the decoder's full-resolution
        activations (128 channels or more per pixel) would otherwise grow with the whole batch.
        A float16 SDXL VAE whose config sets force_upcast decodes in float32 (it overflows in float16), as
        diffusers' SDXL pipeline does; SD 1 / 2 decode in the VAE's dtype, as diffusers' SD pipeline does."""
        upcast = self.is_sdxl and self.vae.config.force_upcast and next(self.vae.parameters()).dtype == torch.float16
        if upcast:
            self.vae.float()
        try:
            pixels = latents.shape[-2] * latents.shape[-1] * self.vae_scale_factor ** 2
            results = []
            for chunk in latents.split(max(1, DECODE_SLICE_PIXELS // pixels)):
                chunk = chunk.to(next(self.vae.parameters()).dtype) / self.vae.config.scaling_factor
                images = self.vae.decode(chunk)  # (b, 3, H, W) in [-1, 1]
                images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # (b, H, W, 3)
                results.append((images.cpu().numpy() * 255).round().astype(np.uint8))
        finally:
            if upcast:  # float16 -> float32 -> float16 gives back the same weights
                self.vae.half()
        return np.concatenate(results)

    def text_encoders(self) -> list:
        """(folder name, model, transformers class name) of each text encoder."""
        encoders = [("text_encoder", self.text_encoder, "CLIPTextModel")]
        if self.is_sdxl:
            encoders.append(("text_encoder_2", self.text_encoder_2, "CLIPTextModelWithProjection"))
        return encoders

    def save(self, path) -> None:
        """A folder -> diffusers layout; a `.safetensors` path -> one LDM single file."""
        path = Path(path)
        if path.suffix == ".safetensors":
            openclip = self.text_encoder.config.hidden_act == "gelu"
            text_kind = "sdxl" if self.is_sdxl else "openclip" if openclip else "clip"
            state_dict = ldm.diffusers_to_ldm(self.unet.state_dict(), self.vae.state_dict(),
                                              self.text_encoder.state_dict(), text_kind,
                                              self.text_encoder_2.state_dict() if self.is_sdxl else None)
            # What the weights cannot reveal (prediction type, head counts, group norms of non-SD widths)
            # travels in the file's metadata; other tools ignore it and infer SD's values.
            metadata = {"prediction_type": self.schedule.config.prediction_type,
                        "unet_config": json.dumps(dataclasses.asdict(self.unet.config)),
                        "vae_config": json.dumps(dataclasses.asdict(self.vae.config)),
                        **{f"{name}_config": json.dumps(dataclasses.asdict(model.config))
                           for name, model, _ in self.text_encoders()}}
            save_state_dict(state_dict, path, metadata=metadata)
            return
        if path.suffix:
            raise ValueError(f"{path}: save to a folder (diffusers layout) or a .safetensors file (single file)")
        with atomic_folder(path, marker="model_index.json") as tmp:  # a crash never leaves a finished-looking folder
            self._write_folder(tmp)

    def _write_folder(self, path: Path) -> None:
        components = {"scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                      "vae": ["diffusers", "AutoencoderKL"]}
        if self.is_sdxl:
            write_json(path / "model_index.json", {
                "_class_name": "StableDiffusionXLPipeline", **components,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "feature_extractor": [None, None],
                "image_encoder": [None, None], "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt})
        else:
            write_json(path / "model_index.json", {
                "_class_name": "StableDiffusionPipeline", **components, "feature_extractor": [None, None],
                "safety_checker": [None, None], "requires_safety_checker": False})
        for name, model, class_name, file_name in [
                ("unet", self.unet, "UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
                ("vae", self.vae, "AutoencoderKL", "diffusion_pytorch_model.safetensors"),
                *[(name, model, class_name, "model.safetensors") for name, model, class_name in self.text_encoders()]]:
            config = config_to_dict(model.config, class_name)
            if name.startswith("text_encoder"):
                config.update(architectures=[class_name], model_type="clip_text_model")
            write_json(path / name / "config.json", config)
            save_state_dict(model.state_dict(), path / name / file_name)
        write_json(path / "scheduler" / "scheduler_config.json",
                   {"_class_name": "DDIMScheduler", **self.schedule.config.to_dict()})
        self.tokenizer.save(path / "tokenizer")
        if self.is_sdxl:
            self.tokenizer_2.save(path / "tokenizer_2")
