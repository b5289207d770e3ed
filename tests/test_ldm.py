"""Single-file LDM <-> diffusers keys, checked against diffusers' own single-file converters on tiny random
SD1-, SD2- and SDXL-style models, plus key/shape checks of the full-size SD 1.5 / 2.1 / XL layouts on the meta
device."""
import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("diffusers")
oracle("transformers")  # every test here compares with diffusers and transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mini_safediff.models.ldm import diffusers_to_ldm, ldm_to_diffusers

from sd_configs import SD15_TEXT, SD15_UNET, SD21_TEXT, SD21_UNET, SD_VAE, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE

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


# SDXL style with what the reader must infer from shapes: 64-channel heads, a depth per level (1 where a level has
# no attention), 256 sinusoids per size number; the second encoder's projection is not square.
TINY_SDXL_UNET = dict(block_out_channels=(64, 64, 128), layers_per_block=2, cross_attention_dim=128,
                      attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                      upcast_attention=None,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=48 + 6 * 256,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                 "conditioner.embedders.1.model.")


def text_2_model(**config) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(**{
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 37, "num_attention_heads": 1,
        "num_hidden_layers": 3, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 48, **config}))


@pytest.fixture(scope="module")
def tiny_sdxl():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, **TINY_SDXL_UNET)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, scaling_factor=0.13025,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text, text_2 = tiny_text_model("quick_gelu"), text_2_model()
    with torch.no_grad():
        for model in (unet, vae, text, text_2):
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    return unet, vae, text, text_2


def test_sdxl_file_is_read_by_diffusers_into_the_reference_weights(tiny_sdxl):
    unet, vae, text, text_2 = tiny_sdxl
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), "sdxl", text_2.state_dict())
    assert all(k.startswith(SDXL_PREFIXES) for k in ldm)
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (64, 48)  # OpenCLIP's x @ P, transposed
    assert_equal_state_dicts(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())
    assert_equal_state_dicts(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())
    assert_equal_state_dicts(convert_ldm_clip_checkpoint(ldm), text_keys(text))
    assert_equal_state_dicts(convert_open_clip_checkpoint(text_2, ldm, prefix="conditioner.embedders.1.model."),
                             text_2.state_dict())


def test_sdxl_reader_round_trips_the_writer_and_infers_the_configs(tiny_sdxl):
    unet, vae, text, text_2 = tiny_sdxl
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), "sdxl", text_2.state_dict())
    # what published SDXL files carry besides the weights
    ldm.update({"conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    parts = ldm_to_diffusers(ldm)
    for name, model, state_dict in (("unet", unet, unet.state_dict()), ("vae", vae, vae.state_dict()),
                                    ("text_encoder", text, text_keys(text)),
                                    ("text_encoder_2", text_2, text_2.state_dict())):
        ours, config = parts[name]
        assert_equal_state_dicts(ours, state_dict)
        assert_config_matches(config, model.config)
    assert (parts["tokenizer_pad_token"], parts["tokenizer_2_pad_token"]) == ("<|endoftext|>", "!")
    assert parts["scheduler"]["timestep_spacing"] == "leading"
    with pytest.raises(ValueError, match=r"or SDXL's two .* found \['conditioner.embedders.0.transformer.\*'\]"):
        ldm_to_diffusers({k: v for k, v in ldm.items() if not k.startswith("conditioner.embedders.1.")})
    with pytest.raises(ValueError, match="a second text encoder goes with text_kind 'sdxl'"):
        diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_keys(text), "clip", text_2.state_dict())


def test_full_size_sdxl_layouts_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
        vae = AutoencoderKL.from_config(SDXL_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    reference = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_keys(text),
                 "text_encoder_2": text_2.state_dict()}
    ldm = diffusers_to_ldm(reference["unet"], reference["vae"], reference["text_encoder"], "sdxl",
                           reference["text_encoder_2"])
    shape = {k: tuple(v.shape) for k, v in ldm.items()}
    # A few names and shapes as the published sd_xl_base_1.0.safetensors has them.
    assert shape["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shape["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shape["model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shape["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shape["model.diffusion_model.output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in shape  # no attention at the first level
    assert shape["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert shape["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shape["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shape["conditioner.embedders.1.model.positional_embedding"] == (77, 1280)

    parts = ldm_to_diffusers(ldm)
    published = {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": SDXL_TEXT, "text_encoder_2": SDXL_TEXT_2}
    models = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text.config.to_dict(),
              "text_encoder_2": text_2.config.to_dict()}
    for name, tensors in reference.items():
        ours, config = parts[name]
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tensors.items()}
        assert_config_matches(config, {**models[name], **published[name]})
    theirs = {"unet": convert_ldm_unet_checkpoint(ldm, dict(unet.config)),
              "vae": convert_ldm_vae_checkpoint(ldm, dict(vae.config)),
              "text_encoder": convert_ldm_clip_checkpoint(ldm),
              "text_encoder_2": convert_open_clip_checkpoint(text_2, ldm, prefix="conditioner.embedders.1.model.")}
    for name, tensors in reference.items():
        assert {k: v.shape for k, v in theirs[name].items()} == {k: v.shape for k, v in tensors.items()}
