"""load_pipeline / Pipeline.save against diffusers/transformers on the same tiny random weights."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mini_safediff as msd
from mini_safediff.models.config import ConfigError

from tiny_models import assert_same_weights, saved_diffusers_pipeline


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def reference(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    prediction_type = "epsilon" if request.param == "sd1" else "v_prediction"
    return folder, saved_diffusers_pipeline(folder, request.param, prediction_type)


@torch.no_grad()
def test_diffusers_folder_matches_the_reference(reference):
    folder, ref = reference
    pipe = msd.load_pipeline(folder, device="cpu")
    torch.manual_seed(1)
    sample, context = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32)
    timesteps = torch.tensor([10, 500])
    assert rel_err(pipe.unet(sample, timesteps, context), ref.unet(sample, timesteps, context).sample) < 1e-4
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    assert rel_err(pipe.vae.encode(images).mean, ref.vae.encode(images).latent_dist.mean) < 1e-4
    assert rel_err(pipe.vae.decode(sample), ref.vae.decode(sample).sample) < 1e-4
    prompts = ["a photo of a cat", "", "Ünïcödé, punctuation!!! ... and    spaces " * 8]
    ids = pipe.tokenizer(prompts)
    ref_ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    assert rel_err(pipe.text_encoder(ids), ref.text_encoder(ids)[0]) < 1e-4
    assert pipe.schedule.config.prediction_type == ref.scheduler.config.prediction_type
    assert pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor


def test_saved_folder_loads_in_diffusers_and_back(reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, ref = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "ours")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(theirs, name), getattr(ref, name))
    assert theirs.tokenizer.pad_token == ref.tokenizer.pad_token
    assert theirs.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    again = msd.load_pipeline(tmp_path / "ours", device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(again, name), getattr(ref, name))


def test_single_file_round_trip(reference, tmp_path):
    folder, ref = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.") for k in keys)
    again = msd.load_pipeline(tmp_path / "model.safetensors", device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(again, name), getattr(ref, name))
    assert again.schedule.config.prediction_type == ref.scheduler.config.prediction_type
    assert again.tokenizer.pad_token_id == ref.tokenizer.pad_token_id
    # Head counts and group norms of non-SD widths are not in the weights: our files carry the configs.
    assert again.unet.config == msd.load_pipeline(folder, device="cpu").unet.config
    forced = msd.load_pipeline(tmp_path / "model.safetensors", device="cpu", prediction_type="epsilon")
    assert forced.schedule.config.prediction_type == "epsilon"


def test_unet_override_in_both_layouts(reference, tmp_path):
    folder, ref = reference
    safe = msd.load_pipeline(folder, device="cpu")
    with torch.no_grad():
        for p in safe.unet.parameters():
            p.mul_(1.5)
    save_file({k: v.contiguous() for k, v in safe.unet.state_dict().items()}, tmp_path / "safe_unet.safetensors")
    safe.save(tmp_path / "safe_full.safetensors")
    ldm_unet_only = {k: v for k, v in load_file(tmp_path / "safe_full.safetensors").items()
                     if k.startswith("model.diffusion_model.")}
    save_file(ldm_unet_only, tmp_path / "safe_unet_ldm.safetensors")
    safe.save(tmp_path / "safe_folder")
    for override in ("safe_unet.safetensors", "safe_unet_ldm.safetensors", "safe_full.safetensors", "safe_folder"):
        pipe = msd.load_pipeline(folder, device="cpu", unet=tmp_path / override)
        assert_same_weights(pipe.unet, safe.unet)
        assert_same_weights(pipe.vae, ref.vae)


def test_unknown_config_option_is_named(reference, tmp_path):
    folder, _ = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "m")
    config_path = tmp_path / "m" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["class_embed_type"] = "timestep"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unet/config.json: option 'class_embed_type' = 'timestep' is not supported"):
        msd.load_pipeline(tmp_path / "m", device="cpu")
    config["class_embed_type"] = None
    config["brand_new_option"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unet/config.json: unknown config option 'brand_new_option'"):
        msd.load_pipeline(tmp_path / "m", device="cpu")


def test_transformers_pickle_name_is_found(reference, tmp_path):
    """Older SD text_encoder/ folders hold only transformers' pytorch_model.bin."""
    folder, _ = reference
    pipe = msd.load_pipeline(folder, device="cpu")
    pipe.save(tmp_path / "m")
    text = tmp_path / "m" / "text_encoder"
    (weights,) = text.glob("*.safetensors")
    torch.save(load_file(weights), text / "pytorch_model.bin")
    weights.unlink()
    ids = pipe.tokenizer(["a photo of a cat"])
    assert torch.equal(msd.load_pipeline(tmp_path / "m", device="cpu").text_encoder(ids), pipe.text_encoder(ids))


def test_wrong_weights_and_missing_parts_are_named(reference, tmp_path):
    folder, _ = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "m")
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    state_dict["decoder.conv_out.weight"] = torch.zeros(3, 32, 5, 5)
    del state_dict["encoder.conv_in.bias"]
    save_file(state_dict, weights)
    with pytest.raises(msd.WeightsError) as err:
        msd.load_pipeline(tmp_path / "m", device="cpu")
    assert "vae/diffusion_pytorch_model.safetensors" in str(err.value)
    assert "encoder.conv_in.bias" in str(err.value)
    assert "decoder.conv_out.weight: file (3, 32, 5, 5) vs model (3, 32, 3, 3)" in str(err.value)
    (tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(msd.WeightsError, match=r"vae: no weight file"):
        msd.load_pipeline(tmp_path / "m", device="cpu")
    with pytest.raises(msd.WeightsError, match=r"no such model folder or file"):
        msd.load_pipeline(tmp_path / "nothing-here", device="cpu")
