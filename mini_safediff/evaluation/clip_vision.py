"""CLIP's image tower and the whole two-tower CLIP model (Radford et al. 2021), as transformers' CLIPModel, for
the clean-quality and Q16 scores of evaluate.py (see scorers.py). The text tower is clip.py's; the vision
tower reuses its encoder layers without the causal mask.

    clip = load_clip("clip-vit-large-patch14")            # a transformers CLIPModel folder
    image_emb = clip.embed_images(images)                 # uint8 (N, H, W, 3) -> (N, projection_dim)
    text_emb = clip.embed_texts(["a photo of a cat"])     # -> (1, projection_dim)

Embeddings are the projected pooled outputs (transformers' get_image_features / get_text_features, OpenAI's
encode_image / encode_text), not normalised. Module names equal the transformers state-dict keys.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..models.clip import ACTIVATIONS, CLIPTextConfig, EncoderLayer, TextTransformer, pool
from ..models.config import ConfigError, config_from_dict, read_config
from ..models.tokenizer import CLIPTokenizer
from ..models.weights import WeightsError, build_model, find_weights, read_state_dict

# Buffers (aranges) that older files carry, openai/clip-vit-large-patch14 among them.
KEYS_SAFE_TO_DROP = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
# Options transformers 4 wrote into every sub-config (generation, fine-tuning, output flags): none changes an
# embedding, and openai/clip-vit-large-patch14 carries them all.
TRANSFORMERS4_KEYS = {
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "bos_token_id", "pad_token_id"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = int(Image.Resampling.BICUBIC)  # 3, the `resample` code of preprocessor_config.json


@dataclass
class CLIPVisionConfig:
    """The keys of a transformers CLIPVisionConfig; defaults are transformers' defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    FIXED = {"dropout": 0.0, "attention_dropout": 0.0}
    # Metadata, initialisation, the token id of the text tower's end (transformers 4 wrote it into both towers),
    # and the tower's projection_dim: CLIPModel reads its own top-level one.
    IGNORED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
               "initializer_factor", "eos_token_id", "projection_dim"}

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"option 'hidden_act' = {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(repr(a) for a in ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size = {self.hidden_size} is not divisible by "
                              f"num_attention_heads = {self.num_attention_heads}")
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ConfigError(f"option 'image_size' = {self.image_size!r} / 'patch_size' = {self.patch_size!r}: "
                              "only square images and patches (one int each) are supported")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size = {self.image_size} is not divisible by patch_size = {self.patch_size}")


def tower_config(cls, raw: dict, overrides: dict | None, name: str):
    """A tower's config from its dict; older files repeat some keys in `*_config_dict`, which win."""
    raw = {key: value for key, value in {**raw, **(overrides or {})}.items() if key not in TRANSFORMERS4_KEYS}
    return config_from_dict(cls, raw, name)


@dataclass
class CLIPConfig:
    """The keys of a transformers CLIPModel config.json; the towers' dicts become their configs."""
    text_config: dict | CLIPTextConfig = field(default_factory=dict)
    vision_config: dict | CLIPVisionConfig = field(default_factory=dict)
    projection_dim: int = 512
    text_config_dict: dict | None = None
    vision_config_dict: dict | None = None

    FIXED = {"model_type": "clip"}
    # logit_scale_init_value only initialises logit_scale, which the weights hold.
    IGNORED = {"architectures", "torch_dtype", "dtype", "transformers_version", "initializer_factor",
               "logit_scale_init_value"}

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = tower_config(CLIPTextConfig, self.text_config, self.text_config_dict, "text_config")
        if isinstance(self.vision_config, dict):
            self.vision_config = tower_config(CLIPVisionConfig, self.vision_config, self.vision_config_dict,
                                              "vision_config")
        self.text_config_dict = self.vision_config_dict = None


class VisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, 1 + (S / P)^2, D)
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, D, S/P, S/P) -> (B, (S/P)^2, D)
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic) OpenAI's ln_pre
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(config, causal=False)
                                                              for _ in range(config.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, S, S) -> pooled output (B, hidden_size): the class token after the last layer norm."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        self.text_model = TextTransformer(text)
        self.vision_model = VisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # no score uses it; loaded so that loading is strict

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, C, S, S) -> projected image embeddings (B, projection_dim)."""
        size = self.config.vision_config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"CLIP vision model: images of {tuple(pixels.shape[-2:])} pixels, expected {size}x{size}")
        return self.visual_projection(self.vision_model(pixels))

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N <= 77) -> projected text embeddings (B, projection_dim), pooled at the end token."""
        return self.text_projection(pool(self.text_model(input_ids), input_ids, self.config.text_config.eos_token_id))


@dataclass
class CLIPImageConfig:
    """The keys of a transformers CLIPImageProcessor preprocessor_config.json; defaults are OpenAI's."""
    size: int | dict = 224  # shortest side after resizing: an int, or {"shortest_edge": n} in newer files
    crop_size: int | dict = 224  # an int, or {"height": h, "width": w}
    image_mean: list = field(default_factory=lambda: list(OPENAI_MEAN))
    image_std: list = field(default_factory=lambda: list(OPENAI_STD))
    rescale_factor: float = 1 / 255

    FIXED = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
             "resample": PIL_BICUBIC}
    # do_convert_rgb: our inputs are RGB already.
    IGNORED = {"feature_extractor_type", "image_processor_type", "processor_class", "do_convert_rgb"}

    def __post_init__(self):
        if isinstance(self.size, dict):
            if set(self.size) != {"shortest_edge"}:
                raise ConfigError(f"option 'size' = {self.size!r} is not supported (only {{'shortest_edge': n}})")
            self.size = self.size["shortest_edge"]
        if isinstance(self.crop_size, int):
            self.crop_size = {"height": self.crop_size, "width": self.crop_size}
        if max(self.crop_size["height"], self.crop_size["width"]) > self.size:
            raise ConfigError(f"crop_size = {self.crop_size} is larger than the resized shortest side {self.size}")


def preprocess(images, config: CLIPImageConfig) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3), or a list of (H, W, 3) of any sizes -> pixels (N, 3, h, w) float32, as
    CLIPImageProcessor does it: bicubic resize (PIL) of the shortest side, centre crop, rescale, normalise."""
    crop_h, crop_w = config.crop_size["height"], config.crop_size["width"]
    crops = []
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"CLIP preprocessing needs uint8 RGB images (H, W, 3), got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        # the longer side is floored, as in torchvision's Resize and transformers
        new_h, new_w = (int(config.size * h / w), config.size) if w <= h else (config.size, int(config.size * w / h))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # transformers floors; torchvision rounds
        crops.append(resized[top:top + crop_h, left:left + crop_w])
    x = (np.stack(crops).astype(np.float64) * config.rescale_factor).astype(np.float32)
    x = (x - np.float32(config.image_mean)) / np.float32(config.image_std)
    return torch.from_numpy(x).permute(0, 3, 1, 2)  # (N, h, w, 3) -> (N, 3, h, w)


@dataclass
class CLIP:
    """A loaded CLIP model with its tokenizer and image preprocessing: what evaluate.py scores with."""
    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_config: CLIPImageConfig

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 32, progress: bool = True) -> np.ndarray:
        """uint8 RGB images (N, H, W, 3) or a list of (H, W, 3) -> projected image embeddings (N, D) float32."""
        if not len(images):
            raise ValueError("embed_images: no images")
        batches = range(0, len(images), batch_size)
        return np.concatenate([
            self.model.image_embeddings(preprocess(images[start:start + batch_size], self.image_config)
                                        .to(self.device, self.model.logit_scale.dtype)).float().cpu().numpy()
            for start in tqdm(batches, desc="CLIP images", disable=not progress or len(batches) < 2)])

    @torch.no_grad()
    def embed_texts(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """Prompts -> projected text embeddings (N, D) float32; prompts longer than 77 tokens are truncated."""
        if not prompts:
            raise ValueError("embed_texts: no prompts")
        return np.concatenate([
            self.model.text_embeddings(self.tokenizer(prompts[start:start + batch_size]).to(self.device))
            .float().cpu().numpy() for start in range(0, len(prompts), batch_size)])


def load_clip(path, device=None, dtype=None) -> CLIP:
    """A transformers CLIPModel folder (config.json, model.safetensors or pytorch_model.bin, and optionally the
    tokenizer files and preprocessor_config.json), e.g. openai/clip-vit-large-patch14. device: defaults to CUDA
    when available; dtype: float32."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no CLIP model folder here (expected a transformers CLIPModel folder, "
                                "e.g. openai/clip-vit-large-patch14)")
    try:
        weights, config = find_weights(path), read_config(path / "config.json", CLIPConfig)
        state_dict = {key: value for key, value in read_state_dict(weights).items() if key not in KEYS_SAFE_TO_DROP}
        model = build_model(CLIPModel, config, state_dict, str(weights), dtype or torch.float32)
    except (ConfigError, WeightsError) as e:  # e.g. an SD text_encoder/ folder, or a CLIPVisionModel
        raise type(e)(f"{e}\n  (load_clip reads a whole transformers CLIPModel folder, such as "
                      "openai/clip-vit-large-patch14)") from None
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    image_config = (read_config(path / "preprocessor_config.json", CLIPImageConfig)
                    if (path / "preprocessor_config.json").is_file() else CLIPImageConfig())
    crop, size = image_config.crop_size, config.vision_config.image_size
    if (crop["height"], crop["width"]) != (size, size):
        raise ConfigError(f"{path / 'preprocessor_config.json'}: crop_size {crop} does not match the model's "
                          f"image_size {size}")
    return CLIP(model=model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                tokenizer=CLIPTokenizer.from_folder(path) if has_tokenizer else CLIPTokenizer.default(),
                image_config=image_config)
