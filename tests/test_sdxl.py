"""SDXL through load_pipeline / Pipeline.save against diffusers' StableDiffusionXLPipeline on the same tiny random
weights: each component, the prompt encoding, both layouts read back by diffusers, float16 decoding."""
import json

import numpy as np
import pytest
import torch
from oracles import oracle
from safetensors.torch import load_file

import mini_safediff as msd

from tiny_models import assert_same_weights, saved_diffusers_pipeline

PROMPTS = ["a photo of a cat", "", "Ünïcödé, punctuation!!! ... and    spaces " * 8]


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return folder, saved_diffusers_pipeline(folder, "sdxl")


@torch.no_grad()
def test_diffusers_folder_matches_the_reference(reference):
    folder, ref = reference
    pipe = msd.load_pipeline(folder, device="cpu")
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
    torch.manual_seed(1)
    sample, context, timesteps = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 64), torch.tensor([10, 500])
    added = {"text_embeds": torch.randn(2, 24), "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24],
                                                                            [1024, 768, 32, 0, 512, 512]])}
    assert rel_err(pipe.unet(sample, timesteps, context, **added),
                   ref.unet(sample, timesteps, context, added_cond_kwargs=added).sample) < 1e-4
    for tokenizer, ref_tokenizer in ((pipe.tokenizer, ref.tokenizer), (pipe.tokenizer_2, ref.tokenizer_2)):
        ids = ref_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(tokenizer(PROMPTS), ids.input_ids)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2(["a"])[0, -1] == 0
    ids = pipe.tokenizer_2(PROMPTS)
    penultimate, pooled = pipe.text_encoder_2(ids)
    out = ref.text_encoder_2(ids, output_hidden_states=True)
    assert rel_err(penultimate, out.hidden_states[-2]) < 1e-4
    assert rel_err(pooled, out.text_embeds) < 1e-4
    assert pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor == 0.13025
    assert rel_err(pipe.vae.decode(sample), ref.vae.decode(sample).sample) < 1e-4


@torch.no_grad()
def test_prompt_encoding_equals_diffusers(reference):
    """The context (both encoders' penultimate hidden states, 32 + 32 features) and the pooled text, for the
    prompts and for the negative prompts."""
    folder, ref = reference
    pipe = msd.load_pipeline(folder, device="cpu")
    negatives = ["blurry", "", "blurry"]
    embeds, negative_embeds, pooled, negative_pooled = ref.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negatives)
    context, ours_pooled = pipe.encode_text(PROMPTS)
    assert context.shape == (3, 77, 64) and ours_pooled.shape == (3, 24)
    assert rel_err(context, embeds) < 1e-4 and rel_err(ours_pooled, pooled) < 1e-4
    context, ours_pooled = pipe.encode_text(negatives)
    assert rel_err(context, negative_embeds) < 1e-4 and rel_err(ours_pooled, negative_pooled) < 1e-4
    _, added = pipe.conditioning(PROMPTS, 16, 24)
    assert added["time_ids"].tolist() == [[16, 24, 0, 0, 16, 24]] * 3
    assert torch.equal(added["time_ids"], ref._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, 24)
                       .repeat(3, 1))


def test_saved_folder_loads_in_diffusers_and_back(reference, tmp_path):
    StableDiffusionXLPipeline = oracle("diffusers").StableDiffusionXLPipeline

    folder, ref = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    theirs = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ours", add_watermarker=False)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    for name in names:
        assert_same_weights(getattr(theirs, name), getattr(ref, name))
    assert theirs.tokenizer.pad_token == "<|endoftext|>" and theirs.tokenizer_2.pad_token == "!"
    assert theirs.vae.config.scaling_factor == 0.13025 and theirs.vae.config.force_upcast
    again = msd.load_pipeline(tmp_path / "ours", device="cpu")
    for name in names:
        assert_same_weights(getattr(again, name), getattr(ref, name))


def test_single_file_round_trip_and_unet_override(reference, tmp_path):
    folder, ref = reference
    pipe = msd.load_pipeline(folder, device="cpu")
    pipe.save(tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    again = msd.load_pipeline(tmp_path / "model.safetensors", device="cpu")
    assert again.is_sdxl and again.tokenizer_2.pad_token == "!" and again.tokenizer.pad_token == "<|endoftext|>"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(again, name), getattr(ref, name))
    assert again.unet.config == pipe.unet.config and again.vae.config == pipe.vae.config
    # the SDXL UNet of a single file (label_emb included) over the base model
    with torch.no_grad():
        for p in again.unet.parameters():
            p.mul_(1.5)
    again.save(tmp_path / "safe.safetensors")
    assert_same_weights(msd.load_pipeline(folder, device="cpu", unet=tmp_path / "safe.safetensors").unet, again.unet)


def test_float16_vae_decodes_in_float32_when_force_upcast(reference):
    folder, _ = reference
    pipe = msd.load_pipeline(folder, device="cpu", dtype=torch.float16)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = pipe.vae.decoder.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    try:
        upcast = pipe.decode_to_uint8(latents.half())
        pipe.vae.config.force_upcast = False
        half = pipe.decode_to_uint8(latents.half())
    finally:
        hook.remove()
        pipe.vae.config.force_upcast = True
    assert seen == [torch.float32, torch.float16]
    assert next(pipe.vae.parameters()).dtype == torch.float16  # handed back as it was
    exact = msd.load_pipeline(folder, device="cpu").decode_to_uint8(latents.half().float())
    assert np.abs(upcast.astype(int) - exact).max() <= 1
    assert upcast.shape == half.shape == (2, 16, 16, 3)


def test_a_folder_naming_sdxl_without_its_second_encoder_is_refused(reference, tmp_path):
    folder, _ = reference
    msd.load_pipeline(folder, device="cpu").save(tmp_path / "m")
    for path in (tmp_path / "m" / "text_encoder_2").iterdir():
        path.unlink()
    (tmp_path / "m" / "text_encoder_2").rmdir()
    with pytest.raises(msd.WeightsError, match="names StableDiffusionXLPipeline, but there is no text_encoder_2/"):
        msd.load_pipeline(tmp_path / "m", device="cpu")
