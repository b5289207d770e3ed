"""Pipeline.generate against diffusers' StableDiffusionPipeline on the same tiny random weights."""
import numpy as np
import pytest
import torch

import mini_safediff as msd

from tiny_models import saved_diffusers_pipeline

PROMPTS = ["a handwritten digit seven", "a photo of a cat"]
NEGATIVES = ["blurry, low quality", ""]


@pytest.fixture(scope="module", params=[("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")],
                ids=["eps", "v", "xl"])
def models(request, tmp_path_factory):
    kind, prediction_type = request.param
    folder = tmp_path_factory.mktemp(kind)
    ref = saved_diffusers_pipeline(folder, kind, prediction_type)
    ref.set_progress_bar_config(disable=True)
    return ref, msd.load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negative", "none"])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("dpmpp-2m", 0.0)])
def test_final_latents_equal_diffusers(models, sampler, eta, negatives):
    """Without a negative prompt SD 1 / 2 guide away from the empty prompt, SDXL from zero embeddings."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ref, ours = models
    scheduler_class = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    ref.scheduler = scheduler_class.from_config(ref.scheduler.config)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # 16x24 px: non-square
    expected = ref(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=10, guidance_scale=7.5,
                   height=16, width=24, latents=latents.clone(), eta=eta, output_type="latent",
                   generator=torch.Generator().manual_seed(5)).images
    got = ours.generate(PROMPTS, negative_prompt=negatives, steps=10, guidance=7.5, height=16, width=24,
                        latents=latents, sampler=sampler, eta=eta, seed=5, return_latents=True, progress=False)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_same_seed_same_images_and_batching_does_not_change_the_noise(models):
    _, ours = models
    kwargs = dict(steps=3, guidance=5.0, progress=False)
    first = ours.generate(PROMPTS, seed=7, **kwargs)
    assert first.dtype == np.uint8 and first.shape == (2, 16, 16, 3)
    assert np.array_equal(first, ours.generate(PROMPTS, seed=7, **kwargs))
    # Noise is per image, so batching changes only float rounding of the batched matmuls (not bit-exact).
    one_by_one = ours.generate(PROMPTS, seed=7, batch_size=1, **kwargs)
    assert np.abs(first.astype(int) - one_by_one).max() <= 1
    assert not np.array_equal(first, ours.generate(PROMPTS, seed=8, **kwargs))


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "the prompt list is empty"),
    (dict(height=15), "height and width must be divisible by 2, got 15x16"),
    (dict(width=9), "height and width must be divisible by 2, got 16x9"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(guidance=-1.0), "guidance must be >= 0, got -1.0"),
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(negative_prompt=["a", "b", "c"]), "3 negative prompts for 2 prompts"),
])
def test_bad_input_is_refused_clearly(models, kwargs, message):
    _, ours = models
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.generate(kwargs.pop("prompts"), progress=False, **kwargs)


def test_each_distinct_prompt_is_encoded_once(models):
    _, ours = models
    seen = []
    encoder = ours.text_encoder_2 if ours.is_sdxl else ours.text_encoder  # SDXL reads the first one's hidden states
    hook = encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        hidden = ours.encode_prompts(["a cat", "", "a cat", ""])
        # negatives "" x 3, prompts "a cat" x 3 (an explicit "": SDXL guides from zeros when given none)
        ours.generate(["a cat"] * 3, negative_prompt="", steps=1, guidance=5.0, progress=False)
    finally:
        hook.remove()
    assert seen == [2, 2]
    alone = torch.cat([ours.encode_prompts([p]) for p in ["a cat", "", "a cat", ""]])
    assert torch.allclose(hidden, alone, atol=1e-6)


def test_vae_decodes_in_slices_with_the_same_images(models, monkeypatch):
    import mini_safediff.models.pipeline as pipeline_module

    _, ours = models
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    whole = ours.decode_to_uint8(latents)
    sizes = []
    hook = ours.vae.decoder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    monkeypatch.setattr(pipeline_module, "DECODE_SLICE_PIXELS", 2 * 16 * 16)  # two 16x16 images per slice
    try:
        sliced = ours.decode_to_uint8(latents)
    finally:
        hook.remove()
    assert sizes == [2, 2, 1]
    assert sliced.shape == whole.shape and np.abs(sliced.astype(int) - whole).max() <= 1
