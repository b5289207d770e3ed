"""The CLIP text transformer that conditions Stable Diffusion (Radford et al. 2021), equal to the
last_hidden_state of transformers' CLIPTextModel: token ids (B, N <= 77) -> hidden states (B, N, D),
after the final layer norm. Instead of ids it also takes their token embeddings (B, N, D), as transformers'
CLIPTextEmbeddings does with inputs_embeds: a prompt attack differentiates through them (unlearndiffatk.py).

SD 1.x uses OpenAI's CLIP ViT-L/14 (quick_gelu); SD 2.x the first 23 of the 24 layers of OpenCLIP's
ViT-H/14 (gelu). SDXL uses two: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection head
(transformers' CLIPTextModelWithProjection); it takes the penultimate layer's hidden states of both, and
the projected pooled output of the second. Module names equal the transformers state-dict keys
(`text_model.*`, `text_projection.*`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # the sigmoid approximation OpenAI's CLIP was trained with
    "gelu": F.gelu,
}


@dataclass
class CLIPTextConfig:
    """The keys of a transformers CLIPTextConfig config.json; defaults are transformers' defaults."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # output width of CLIP's projection head (CLIPTextModelWithProjection, CLIPModel)
    eos_token_id: int = 49407  # where the pooled output is taken (see `pool`)

    FIXED = {"dropout": 0.0, "attention_dropout": 0.0}
    # Metadata, initialisation, and token ids used only by the tokenizer.
    IGNORED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
               "initializer_factor", "bos_token_id", "pad_token_id"}

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CLIP text config: option 'hidden_act' = {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(repr(a) for a in ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP text config: hidden_size = {self.hidden_size} is not divisible by "
                              f"num_attention_heads = {self.num_attention_heads}")


class Attention(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.causal = causal  # the text tower reads left to right; the vision tower (clip_vision.py) sees every patch
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, D / heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Causal even over padding: SD conditions on every position, padding included, and passes no mask.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, N), or their token embeddings (B, N, D) -> (B, N, D) with the positions added."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("CLIP text model: give input_ids or inputs_embeds, exactly one")
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        return inputs_embeds + self.position_embedding.weight[:inputs_embeds.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        # A ModuleDict only to give the keys their `encoder.layers.N` level.
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(config)
                                                              for _ in range(config.num_hidden_layers))})
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, N) with N <= max_position_embeddings, or their token embeddings (B, N, hidden_size)
        -> last hidden state (B, N, hidden_size)."""
        return self.hidden_states(input_ids, inputs_embeds)[1]

    def hidden_states(self, input_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate, last), both (B, N, hidden_size): the input of the last layer (transformers'
        hidden_states[-2], no final layer norm: what SDXL conditions on) and the last hidden state."""
        positions = self.embeddings.position_embedding.num_embeddings
        tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if tokens > positions:
            raise ValueError(f"CLIP text model: {tokens} tokens, at most {positions} fit")
        x = self.embeddings(input_ids, inputs_embeds)
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        return x, self.final_layer_norm(self.encoder.layers[-1](x))


def pool(last_hidden_state: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Each text's last hidden state at its first end token, (B, N, D) -> (B, D). With the legacy value 2 of
    configs written before mid-2023 (such as SD's), transformers takes the highest id instead: <|endoftext|>
    is the last in the vocabulary, so this is the same token for tokenizer output."""
    if eos_token_id == 2:
        end = input_ids.argmax(-1)
    else:
        end = (input_ids == eos_token_id).int().argmax(-1)
    return last_hidden_state[torch.arange(len(input_ids), device=input_ids.device), end.to(input_ids.device)]


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_model(input_ids, inputs_embeds)


class CLIPTextModelWithProjection(nn.Module):
    """The text model and CLIP's projection of its pooled output (a Linear without bias): SDXL's second text
    encoder. Returns what SDXL takes from it: the penultimate hidden states (B, N, hidden_size), which join
    the first encoder's as the context, and the projected pooled output, transformers' text_embeds
    (B, projection_dim), which enters the UNet's added conditioning."""
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        penultimate, last = self.text_model.hidden_states(input_ids)
        return penultimate, self.text_projection(pool(last, input_ids, self.config.eos_token_id))
