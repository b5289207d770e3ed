"""AutoencoderKL against diffusers' AutoencoderKL on the same random weights, loaded from a saved folder."""
import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("diffusers")  # every test here compares with diffusers
from diffusers import AutoencoderKL as RefAutoencoderKL
from safetensors.torch import load_file

from mini_safediff.models.config import ConfigError, config_from_dict, read_config
from mini_safediff.models.vae import AutoencoderKL, VAEConfig

from sd_configs import SD_VAE, SDXL_VAE

TINY = {
    # 2 levels, one resnet per encoder block, 8 channels per group
    "small": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    # 3 levels (two down- and upsamplings), two resnets per encoder block, 1 channel per group at 32
    "deep": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32, latent_channels=3),
}


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def saved_pair(folder, **options):
    """A random diffusers VAE saved with save_pretrained, and ours loaded from that folder."""
    levels = len(options["block_out_channels"])
    torch.manual_seed(0)
    ref = RefAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels, **options)
    with torch.no_grad():  # move every weight off its initial value (norms start at 1 and 0)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(folder)
    ours = AutoencoderKL(read_config(folder / "config.json", VAEConfig))
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return ours.eval(), ref


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_encode_sample_decode_equal_diffusers(tmp_path, name):
    ours, ref = saved_pair(tmp_path, **TINY[name])
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    posterior, ref_posterior = ours.encode(images), ref.encode(images).latent_dist
    factor = 2 ** (len(TINY[name]["block_out_channels"]) - 1)
    assert posterior.mean.shape == (2, ref.config.latent_channels, 24 // factor, 40 // factor)
    assert rel_err(posterior.mean, ref_posterior.mean) < 1e-4
    assert rel_err(posterior.std, ref_posterior.std) < 1e-4
    assert rel_err(posterior.logvar, ref_posterior.logvar) < 1e-4
    latents = posterior.sample(generator=torch.Generator().manual_seed(2))
    ref_latents = ref_posterior.sample(generator=torch.Generator().manual_seed(2))
    assert rel_err(latents, ref_latents) < 1e-4
    decoded = ours.decode(latents)
    assert decoded.shape == images.shape
    assert rel_err(decoded, ref.decode(latents).sample) < 1e-4


def test_logvar_clamped_like_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from mini_safediff.models.vae import DiagonalGaussian
    moments = torch.randn(1, 8, 2, 3) * 40  # log-variances far outside [-30, 20]
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    assert torch.equal(ours.logvar, ref.logvar) and torch.equal(ours.std, ref.std)


def test_scaling_factor_and_force_upcast_read_from_config():
    assert config_from_dict(VAEConfig, SD_VAE).scaling_factor == 0.18215
    sdxl = config_from_dict(VAEConfig, SDXL_VAE)
    assert sdxl.scaling_factor == 0.13025 and sdxl.force_upcast
    assert not config_from_dict(VAEConfig, {**SDXL_VAE, "force_upcast": False}).force_upcast
    assert config_from_dict(VAEConfig, SD_VAE).force_upcast == RefAutoencoderKL.from_config(SD_VAE).config.force_upcast


@pytest.mark.parametrize("config", [SD_VAE, SDXL_VAE], ids=["sd", "sdxl"])
def test_full_size_vae_keys_and_shapes_equal_diffusers(config):
    with torch.device("meta"):
        ours = AutoencoderKL(config_from_dict(VAEConfig, config, "vae/config.json"))
        ref = RefAutoencoderKL(**config)
    ours_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    ref_shapes = {key: tuple(value.shape) for key, value in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


@pytest.mark.parametrize("key, value", [
    ("act_fn", "gelu"), ("use_quant_conv", False), ("mid_block_add_attention", False), ("shift_factor", 0.1159),
    ("down_block_types", ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),  # one block fewer than block_out_channels
    ("norm_type", "spatial"),  # unknown option
])
def test_unsupported_config_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(VAEConfig, {**SD_VAE, key: value}, "vae/config.json")
