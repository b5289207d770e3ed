"""The Stable Diffusion VAE (Rombach et al. 2022), equal to diffusers' AutoencoderKL.

encode: images (B, 3, H, W) in [-1, 1] -> a diagonal Gaussian over latents (B, 4, H/8, W/8) (for SD's
4 levels); decode: latents -> images. The latents are unscaled here: the diffusion model works on
latents * config.scaling_factor. Module names equal diffusers' state-dict keys.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

EPS = 1e-6  # every GroupNorm of the VAE


@dataclass
class VAEConfig:
    """The keys of a diffusers AutoencoderKL config.json; defaults are diffusers' defaults."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] = field(default_factory=lambda: ["DownEncoderBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpDecoderBlock2D"])
    block_out_channels: list[int] = field(default_factory=lambda: [64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # only diffusers' tiled decoding reads it
    scaling_factor: float = 0.18215  # SDXL: 0.13025
    # Decode in float32 when the model runs in float16: SDXL's VAE overflows in float16. diffusers' SDXL pipeline
    # reads it (as Pipeline.decode_to_uint8 does for SDXL); its SD 1 / 2 pipeline does not.
    force_upcast: bool = True

    # The SD VAE: SiLU, both 1x1 quant convs, attention in the mid blocks, latents only scaled (no shift).
    FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for key, block in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
            value = getattr(self, key)
            if list(value) != [block] * levels:
                raise ConfigError(f"VAE config: option {key!r} = {value!r} is not supported "
                                  f"(supported: {[block] * levels!r}, one per block_out_channels entry)")
        if any(channels % self.norm_num_groups for channels in self.block_out_channels):
            raise ConfigError(f"VAE config: option 'norm_num_groups' = {self.norm_num_groups} is not supported "
                              f"(supported: a divisor of every block_out_channels entry {self.block_out_channels})")


class DiagonalGaussian:
    """The encoder's posterior q(z | x), as diffusers' DiagonalGaussianDistribution."""

    def __init__(self, moments: torch.Tensor):  # (B, 2 * latent_channels, h, w): means, then log-variances
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the generator's device, then moved, as diffusers' randn_tensor does: a CPU seed gives the
        # same latents on every device.
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (the mid blocks)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers keeps a dropout at to_out.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only: (H, W) -> (H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.Sequential:
    # An nn.Sequential has the same state-dict keys as diffusers' ModuleList (resnets.0, resnets.1, ...).
    return nn.Sequential(*(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                           for i in range(layers)))


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.Sequential(Downsample(out_channels)) if downsample else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamplers(self.resnets(x))


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.Sequential(Upsample(out_channels)) if upsample else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsamplers(self.resnets(x))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                             downsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups  # deepest level first
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                           upsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, C, H, W) in [-1, 1] -> posterior over unscaled latents (B, latent_channels, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images (B, C, H, W), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))
