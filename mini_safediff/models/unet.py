"""The denoising UNet of Stable Diffusion 1.x / 2.x / XL, equal to diffusers' UNet2DConditionModel.

    eps (or v) = UNet2DConditionModel(config)(noisy_latents, timestep, text_embeddings)
    eps = sdxl_unet(noisy_latents, timestep, text_embeddings, text_embeds=pooled, time_ids=size_and_crop)

Down path: conv_in, then per resolution `layers_per_block` resnets (each followed by a spatial
transformer in cross-attention blocks) and a stride-2 conv; every intermediate output is kept as
a skip connection. Middle: resnet, transformer, resnet. Up path: the mirror image, each resnet
taking one skip concatenated on the channels, with one extra resnet per resolution to take the
skip that came out of the down path's stride-2 conv. The timestep enters every resnet as a bias;
the text enters every transformer through cross-attention. SDXL adds to the timestep embedding an MLP of the
pooled text embedding and of the image's original size, crop corner and target size (Podell et al. 2023, 2.2).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError

DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has cross-attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


@dataclass
class UNetConfig:
    """diffusers' UNet2DConditionModel config keys that SD 1.x / 2.x / XL use; defaults are SD 1.5's."""
    sample_size: int | list[int] = 64  # latent side the model was trained at (pipelines read it; the net takes any)
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    # diffusers' naming quirk: in SD configs this is the number of heads (SD 1: 8 everywhere; SD 2 and XL: one
    # entry per down block, 64-channel heads), not their width.
    attention_head_dim: int | list[int] = 8
    transformer_layers_per_block: int | list[int] = 1  # transformer blocks per spatial transformer, per down block (XL)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # SD 2: proj_in / proj_out are Linear, SD 1: 1x1 convs
    upcast_attention: bool | None = False  # SD 2: attention in float32 (its fp16 attention logits overflow)
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL: "text_time", the pooled text embedding and sinusoids of six size / crop numbers into the time embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid features per size / crop number
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + 6 * addition_time_embed_dim

    # Every other UNet2DConditionModel option, at the only value implemented here (diffusers' default).
    FIXED = {
        "act_fn": "silu", "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "mid_block_scale_factor": 1, "downsample_padding": 1, "dropout": 0.0, "only_cross_attention": False,
        "dual_cross_attention": False, "num_attention_heads": None,
        "reverse_transformer_layers_per_block": None, "attention_type": "default",
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_dim": None,
        "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embed_type": None, "num_class_embeds": None,
        "class_embeddings_concat": False, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
    }
    # Options read only by block types, embeddings or modes that the FIXED values above switch off.
    IGNORED = {"resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
               "mid_block_only_cross_attention", "addition_embed_type_num_heads"}

    def __post_init__(self):
        blocks = len(self.block_out_channels)
        checks = [("down_block_types", all(t in DOWN_BLOCKS for t in self.down_block_types), list(DOWN_BLOCKS)),
                  ("up_block_types", all(t in UP_BLOCKS for t in self.up_block_types), list(UP_BLOCKS)),
                  ("down_block_types", len(self.down_block_types) == blocks, "one per block_out_channels entry"),
                  ("up_block_types", len(self.up_block_types) == blocks, "one per block_out_channels entry"),
                  ("attention_head_dim", isinstance(self.attention_head_dim, int)
                   or len(self.attention_head_dim) == blocks, "an int or one per block"),
                  ("transformer_layers_per_block", isinstance(self.transformer_layers_per_block, int)
                   or len(self.transformer_layers_per_block) == blocks, "an int or one int per block"),
                  ("norm_num_groups", all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                   f"a divisor of every block_out_channels entry {self.block_out_channels}"),
                  ("addition_embed_type", self.addition_embed_type in (None, "text_time"), [None, "text_time"]),
                  ("projection_class_embeddings_input_dim", self.addition_embed_type is None or isinstance(
                      self.projection_class_embeddings_input_dim, int), "an int with addition_embed_type"),
                  ("addition_time_embed_dim", self.addition_embed_type is None or isinstance(
                      self.addition_time_embed_dim, int), "an int with addition_embed_type")]
        for key, ok, supported in checks:
            if not ok:
                raise ConfigError(f"unet config: option {key!r} = {getattr(self, key)!r} is not supported "
                                  f"(supported: {supported})")

    @property
    def heads(self) -> list:
        """Number of attention heads per down block (the up blocks use them in reverse, the middle the last)."""
        heads = self.attention_head_dim
        return [heads] * len(self.block_out_channels) if isinstance(heads, int) else list(heads)

    @property
    def depths(self) -> list:
        """Transformer blocks per spatial transformer, per down block (up blocks in reverse, the middle the last)."""
        depth = self.transformer_layers_per_block
        return [depth] * len(self.block_out_channels) if isinstance(depth, int) else list(depth)


def call(module, *args):
    return module(*args)


def checkpointed(module, *args):
    """Keep only the module's inputs; recompute its activations during backward."""
    return checkpoint(module, *args, use_reentrant=False)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal features of the (B,) timesteps, (B, dim) float32: frequencies 10000^(-i / (dim/2 - shift))."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * exponent.exp()[None]
    return torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, config: UNetConfig):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        """emb: the timestep embedding after SiLU, (B, emb_dim); it shifts every channel of every pixel."""
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a parameterless dropout

    def forward(self, x, context):
        """x: (B, N, dim) queries; context: (B, M, context_dim) keys and values (x itself for self-attention)."""
        # (B, tokens, heads * head_dim) -> (B, heads, tokens, head_dim)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2).to(x.dtype))  # back to (B, N, dim)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # diffusers' net.1 is a parameterless dropout: keep its index so the Linear stays at net.2
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each with a residual."""
    def __init__(self, dim: int, heads: int, config: UNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim, config.upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, config.cross_attention_dim, config.upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """The feature map as a sequence of H*W tokens through `depth` transformer blocks, added back to the input."""
    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, config)
                                                 for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, run=call):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C): a token per pixel
        # SD 1's 1x1 convs act as Linears on the tokens (weight (C, C, 1, 1) viewed as (C, C)): one matmul over
        # all pixels, whose output is the contiguous (B, HW, C) the blocks want (a conv's output, permuted,
        # would be copied again by the first LayerNorm).
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            h = run(block, h, context)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # back to (B, C, H, W), a strided view
        return x + h  # x first: the sum comes out in x's contiguous layout, no separate copy of h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # Nearest-neighbour to the skip's size: 2x, or 2x - 1 where the down path halved an odd side.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (heads > 0) or DownBlock2D (heads = 0) at one resolution."""
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, heads: int, depth: int, downsample: bool,
                 config: UNetConfig):
        super().__init__()
        layers = config.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    emb_dim, config) for i in range(layers)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_channels, heads, depth, config)
                                         for _ in range(layers)]) if heads else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x, emb, context, run):
        """Returns the output and the skips: every resnet's (or transformer's) output, then the downsampled one."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, run)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (heads > 0) or UpBlock2D (heads = 0) at one resolution: one resnet per
    skip, the last skip coming from the next-higher resolution (skip_channels)."""
    def __init__(self, prev_channels: int, out_channels: int, skip_channels: int, emb_dim: int, heads: int,
                 depth: int, upsample: bool, config: UNetConfig):
        super().__init__()
        layers = config.layers_per_block + 1
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_channels if i == 0 else out_channels)
                          + (skip_channels if i == layers - 1 else out_channels), out_channels, emb_dim, config)
            for i in range(layers)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_channels, heads, depth, config)
                                         for _ in range(layers)]) if heads else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x, emb, context, skips, size, run):
        """skips: this block's skips in down-path order (consumed last first); size: the upsampled (H, W)."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = run(resnet, torch.cat([x, skip], dim=1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, run)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, channels: int, emb_dim: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, emb_dim, config) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, depth, config)])

    def forward(self, x, emb, context, run):
        x = run(self.resnets[0], x, emb)
        x = self.attentions[0](x, context, run)
        return run(self.resnets[1], x, emb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        # When True (and training with gradients), each resnet and transformer block recomputes its
        # activations during backward instead of storing them: less memory, about one more forward.
        self.gradient_checkpointing = False
        channels, heads, depths = config.block_out_channels, config.heads, config.depths
        emb_dim = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], emb_dim)
        if config.addition_embed_type == "text_time":  # diffusers' add_time_proj (the sinusoids) has no weights
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, emb_dim)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock(channels[max(i - 1, 0)], channels[i], emb_dim,
                                              heads[i] if DOWN_BLOCKS[block_type] else 0, depths[i],
                                              downsample=i < len(channels) - 1, config=config))
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], emb_dim, heads[-1], depths[-1], config)
        self.up_blocks = nn.ModuleList()
        up_channels, up_heads, up_depths = channels[::-1], heads[::-1], depths[::-1]
        for i, block_type in enumerate(config.up_block_types):
            self.up_blocks.append(UpBlock(up_channels[max(i - 1, 0)], up_channels[i],
                                          up_channels[min(i + 1, len(channels) - 1)], emb_dim,
                                          up_heads[i] if UP_BLOCKS[block_type] else 0, up_depths[i],
                                          upsample=i < len(channels) - 1, config=config))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sample: (B, in_channels, H, W) noisy latents; timestep: a number, a 0-d tensor, or a (1,) or (B,)
        tensor; encoder_hidden_states: (B, tokens, cross_attention_dim). SDXL only (diffusers passes them in
        added_cond_kwargs): text_embeds (B, pooled width), the pooled text embedding; time_ids (B, 6), the
        original height and width, the crop's top and left, the target height and width.
        Returns (B, out_channels, H, W)."""
        run = checkpointed if self.gradient_checkpointing and self.training and torch.is_grad_enabled() else call
        # One timestep for the whole batch (as in sampling) makes one embedding row that every resnet
        # broadcasts: the time MLP and the resnets' projections of it run once, not once per image.
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)  # (1,) or (B,)
        if len(t) not in (1, len(sample)):
            raise ValueError(f"unet: {len(t)} timesteps for a batch of {len(sample)}")
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype))
        sdxl = self.config.addition_embed_type == "text_time"
        if (text_embeds is not None, time_ids is not None) != (sdxl, sdxl):
            raise ValueError("unet: text_embeds and time_ids are " + ("both needed by this UNet (addition_embed_type "
                             "'text_time', SDXL)" if sdxl else "for SDXL UNets only"))
        if sdxl:
            # Each of the six numbers becomes its own sinusoids, as a timestep does; the pooled text comes first.
            time_features = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim,
                                               self.config.flip_sin_to_cos, self.config.freq_shift)
            added = torch.cat([text_embeds, time_features.reshape(len(text_embeds), -1)], dim=-1)
            emb = emb + self.add_embedding(added.to(sample.dtype))
        # Every resnet applies SiLU to the embedding before its projection: do it once here.
        emb = F.silu(emb)
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, run)
            skips += block_skips
        x = self.mid_block(x, emb, context, run)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            x = block(x, emb, context, block_skips, skips[-1].shape[-2:] if skips else None, run)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
