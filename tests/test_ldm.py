"""Single-file LDM <-> diffusers keys, checked against diffusers' own single-file converters on tiny random
SD1- and SD2-style models, plus key/shape checks of the full-size SD 1.5 / 2.1 layouts on the meta device."""
import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("diffusers")
oracle("transformers")  # every test here compares with diffusers and transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from mini_safediff.models.ldm import diffusers_to_ldm, ldm_to_diffusers

from sd_configs import SD15_TEXT, SD15_UNET, SD21_TEXT, SD21_UNET, SD_VAE

# Head counts are not in the weights: the reader assumes SD's (8 heads for SD1, 64-channel heads for SD2),
# so the tiny models follow them. Three SD2 blocks put upsamplers after both a plain and an attention block.
TINY = {
    "sd1": (dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), "quick_gelu", "clip"),
    "sd2": (dict(block_out_channels=(64, 64, 128), layers_per_block=2, cross_attention_dim=48,
                 attention_head_dim=(1, 1, 2), use_linear_projection=True, upcast_attention=True,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), "gelu", "openclip"),
}


def text_keys(model: CLIPTextModel) -> dict:
    """transformers 5 saves CLIP text keys without the `text_model.` level that SD files and our model use."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}


def tiny_text_model(hidden_act: str, layers: int = 2) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=37, num_attention_heads=1,
                                        num_hidden_layers=layers, max_position_embeddings=77, hidden_act=hidden_act))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request):
    unet_kwargs, hidden_act, text_kind = TINY[request.param]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, **unet_kwargs)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = tiny_text_model(hidden_act)
    with torch.no_grad():  # distinct values everywhere: a swapped pair of zero-initialised tensors would pass
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return unet, vae, text, text_kind


def assert_equal_state_dicts(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def assert_config_matches(inferred: dict, config):
    for key, value in inferred.items():
        expected = config[key] if isinstance(config, dict) else getattr(config, key)
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key


def test_diffusers_reads_our_file_into_the_reference_weights(tiny):
    unet, vae, text, text_kind = tiny
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), text_kind)
    assert_equal_state_dicts(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())
    assert_equal_state_dicts(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())
    theirs = convert_ldm_clip_checkpoint(ldm) if text_kind == "clip" else convert_open_clip_checkpoint(text, ldm)
    assert_equal_state_dicts(theirs, text_keys(text))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in ldm)


def test_reader_round_trips_the_writer_and_infers_the_configs(tiny):
    unet, vae, text, text_kind = tiny
    parts = ldm_to_diffusers(diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), text_kind))
    for name, model, state_dict in (("unet", unet, unet.state_dict()), ("vae", vae, vae.state_dict()),
                                    ("text_encoder", text, text_keys(text))):
        ours, config = parts[name]
        assert_equal_state_dicts(ours, state_dict)
        assert_config_matches(config, model.config)
    assert parts["tokenizer_pad_token"] == ("<|endoftext|>" if text_kind == "clip" else "!")
    assert parts["scheduler"] == {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                  "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "clip_sample": False,
                                  "set_alpha_to_one": False, "prediction_type": "epsilon"}
    forced = ldm_to_diffusers(diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), text_kind),
                              prediction_type="v_prediction")
    assert forced["scheduler"]["prediction_type"] == "v_prediction"


def test_reader_accepts_published_file_extras(tiny):
    """SD 1 files nest CLIP under `text_model.` (or not), and carry schedule buffers, EMA and position ids."""
    unet, vae, text, text_kind = tiny
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), text_kind)
    ldm.update({"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999),
                "model_ema.diffusion_modelout2weight": torch.ones(1)})
    if text_kind == "clip":
        ldm = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in ldm.items()}
        ldm["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        ldm.update({"cond_stage_model.model.logit_scale": torch.tensor(4.6),
                    "cond_stage_model.model.text_projection": torch.randn(64, 32)})
    assert_equal_state_dicts(ldm_to_diffusers(ldm)["text_encoder"][0], text_keys(text))


def test_openclip_last_of_24_blocks_is_dropped_like_diffusers_does():
    torch.manual_seed(0)
    text = tiny_text_model("gelu", layers=23)
    unet = UNet2DConditionModel(sample_size=8, **TINY["sd1"][0])
    vae = AutoencoderKL(block_out_channels=(32,))
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), "openclip")
    # A published SD 2 file holds OpenCLIP's whole 24-block tower and its projection head.
    tower = "cond_stage_model.model.transformer.resblocks."
    ldm.update({k.replace(f"{tower}22.", f"{tower}23."): torch.randn_like(v)
                for k, v in ldm.items() if k.startswith(f"{tower}22.")})
    ldm["cond_stage_model.model.text_projection"] = torch.randn(64, 32)  # (width, embed dim)
    assert _count_blocks(ldm) == 24

    ours, config = ldm_to_diffusers(ldm)["text_encoder"]
    assert_equal_state_dicts(ours, convert_open_clip_checkpoint(text, ldm))
    assert_equal_state_dicts(ours, text_keys(text))
    assert config["num_hidden_layers"] == 23
    with pytest.raises(ValueError, match="at most 23 layers, got 24"):
        diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(tiny_text_model("gelu", 24)), "openclip")


def _count_blocks(ldm: dict) -> int:
    return len({k.split(".")[4] for k in ldm if k.startswith("cond_stage_model.model.transformer.resblocks.")})


@pytest.mark.parametrize("unet_config, text_config, text_kind", [(SD15_UNET, SD15_TEXT, "clip"),
                                                                  (SD21_UNET, SD21_TEXT, "openclip")])
def test_full_size_layouts_on_meta(unet_config, text_config, text_kind):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    models = {"unet": unet, "vae": vae, "text_encoder": text}
    reference = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_keys(text)}
    ldm = diffusers_to_ldm(reference["unet"], reference["vae"], reference["text_encoder"], text_kind)
    shape = {k: tuple(v.shape) for k, v in ldm.items()}
    # A few names and shapes as the published files have them.
    assert shape["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (
        (320, 320) if text_kind == "openclip" else (320, 320, 1, 1))
    assert shape["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shape["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shape["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shape["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    if text_kind == "openclip":
        assert shape["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
        assert _count_blocks(ldm) == 23
    else:
        assert shape["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)

    parts = ldm_to_diffusers(ldm)
    published = {"unet": unet_config, "vae": SD_VAE, "text_encoder": text_config}
    for name, tensors in reference.items():
        ours, config = parts[name]
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tensors.items()}
        model_config = models[name].config
        model_config = model_config.to_dict() if name == "text_encoder" else dict(model_config)
        assert_config_matches(config, {**model_config, **published[name]})
    theirs = {"unet": convert_ldm_unet_checkpoint(ldm, dict(unet.config)),
              "vae": convert_ldm_vae_checkpoint(ldm, dict(vae.config)),
              "text_encoder": convert_ldm_clip_checkpoint(ldm) if text_kind == "clip"
              else convert_open_clip_checkpoint(text, ldm)}
    for name, tensors in reference.items():
        assert {k: v.shape for k, v in theirs[name].items()} == {k: v.shape for k, v in tensors.items()}


def test_unexpected_keys_are_named(tiny):
    unet, vae, text, text_kind = tiny
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), text_kind)
    with pytest.raises(ValueError, match=r"unexpected keys .*: model.diffusion_model.input_blocks.1.7.weight"):
        ldm_to_diffusers({**ldm, "model.diffusion_model.input_blocks.1.7.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys .*: first_stage_model.loss.logvar"):
        ldm_to_diffusers({**ldm, "first_stage_model.loss.logvar": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys .*: conditioner.embedders.0.foo"):
        ldm_to_diffusers({**ldm, "conditioner.embedders.0.foo": torch.zeros(1)})
    if text_kind == "openclip":
        with pytest.raises(ValueError, match=r"unexpected keys .*: cond_stage_model.model.transformer.attn_mask"):
            ldm_to_diffusers({**ldm, "cond_stage_model.model.transformer.attn_mask": torch.zeros(1)})
    with pytest.raises(ValueError, match="no VAE keys"):
        ldm_to_diffusers({k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")})
