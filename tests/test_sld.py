"""Safe Latent Diffusion in Pipeline.generate against diffusers' StableDiffusionPipelineSafe on the same tiny
random weights, scheduler and starting latents; and its settings.

The comparisons run in float64. SLD's scale min(1, s_s |eps_text - eps_concept|) has a slope of s_s (5000 in the
max preset) wherever the difference is small, as it is almost everywhere on random weights: float32 rounding
differences in the UNet (another kernel or thread count) are multiplied by it at each step: in float32 the
v-prediction model's max preset without negatives differed from diffusers by 7.1e-5 on one machine and 1.1e-4 on
another. In float64 what is left is diffusers' float32 noise schedule (1e-7 to 1e-6; 3.3e-6 in that case)."""
import dataclasses
import warnings

import pytest
import torch
from builders import tiny_pipeline
from oracles import oracle

import mini_safediff as msd
from mini_safediff.methods.sld import DEFAULT_SAFETY_CONCEPT, SLD_PRESETS, SLDConfig, sld_config, sld_hook

from tiny_models import saved_diffusers_pipeline

PROMPTS = ["a handwritten digit seven", "a photo of a cat"]
NEGATIVES = ["blurry, low quality", ""]
STEPS = 20  # 5 steps past the longest warm-up (the weak preset's 15)


@pytest.fixture(scope="module", params=[("sd1", "epsilon"), ("sd2", "v_prediction")], ids=["sd1", "sd2-v"])
def models(request, tmp_path_factory):
    """diffusers' safe pipeline (no safety checker) and ours, both DDIM over the same saved weights."""
    diffusers = oracle("diffusers")
    kind, prediction_type = request.param
    folder = tmp_path_factory.mktemp(kind)
    base = saved_diffusers_pipeline(folder, kind, prediction_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline is deprecated in diffusers
        ref = diffusers.StableDiffusionPipelineSafe(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref.to(dtype=torch.float64), msd.load_pipeline(folder, device="cpu", dtype=torch.float64)


def diffusers_latents(ref, latents, **kwargs) -> torch.Tensor:
    """The safe pipeline always decodes: its final latents come from the step callback."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Safety checker disabled!" when SLD is off
        ref(latents=latents.clone(), callback=lambda i, t, x: seen.append(x.clone()), callback_steps=1,
            output_type="np", **kwargs)
    return seen[-1]


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negative", "none"])
@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_presets_equal_diffusers_safe_pipeline(models, preset, negatives):
    ref, ours = models
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0)).double()  # 16x24 px: non-square
    config = SLD_PRESETS[preset]
    expected = diffusers_latents(ref, latents, prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS,
                                 guidance_scale=7.5, height=16, width=24,
                                 **{f"sld_{f.name}": getattr(config, f.name) for f in dataclasses.fields(config)})
    got = ours.generate(PROMPTS, negative_prompt=negatives, steps=STEPS, guidance=7.5, height=16, width=24,
                        latents=latents, return_latents=True, progress=False, guidance_hook=sld_hook(preset))
    plain = ours.generate(PROMPTS, negative_prompt=negatives, steps=STEPS, guidance=7.5, height=16, width=24,
                          latents=latents, return_latents=True, progress=False)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    assert ((got - plain).norm() / plain.norm()).item() > 1e-3  # SLD did change the result


@pytest.mark.parametrize("guidance,settings", [(1.0, {"sld_guidance_scale": 1000}), (7.5, {"sld_guidance_scale": 1})],
                         ids=["no-cfg", "scale-1"])
def test_sld_is_off_where_diffusers_turns_it_off(models, guidance, settings):
    """diffusers applies SLD only when guidance > 1 and sld_guidance_scale > 1; a custom concept is encoded."""
    ref, ours = models
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    kwargs = dict(steps=4, guidance=guidance, latents=latents, return_latents=True, progress=False)
    expected = diffusers_latents(ref, latents, prompt=PROMPTS, num_inference_steps=4, guidance_scale=guidance,
                                 **settings)
    got = ours.generate(PROMPTS, guidance_hook=sld_hook(settings, "a cat"), **kwargs)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    assert torch.equal(got, ours.generate(PROMPTS, **kwargs))


def test_custom_concept_and_settings_equal_diffusers(models):
    ref, ours = models
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    settings = {"sld_warmup_steps": 2, "sld_guidance_scale": 300, "sld_threshold": 0.02, "sld_momentum_scale": 0.4,
                "sld_mom_beta": 0.5}
    ref.safety_concept = "a handwritten digit seven"
    try:
        expected = diffusers_latents(ref, latents, prompt=PROMPTS, num_inference_steps=6, guidance_scale=5.0,
                                     **settings)
    finally:
        ref.safety_concept = DEFAULT_SAFETY_CONCEPT
    got = ours.generate(PROMPTS, steps=6, guidance=5.0, latents=latents, return_latents=True, progress=False,
                        guidance_hook=sld_hook({key.removeprefix("sld_") if key.endswith("beta") else key: value
                                                for key, value in settings.items()}, "a handwritten digit seven"))
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_default_concept_and_presets_are_diffusers(models):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    ref, _ = models
    assert ref.safety_concept == DEFAULT_SAFETY_CONCEPT
    for name, table in [("weak", SafetyConfig.WEAK), ("medium", SafetyConfig.MEDIUM),
                        ("strong", SafetyConfig.STRONG), ("max", SafetyConfig.MAX)]:
        assert sld_config(name) == sld_config(table)
    assert sld_config({}) == SLD_PRESETS["medium"]  # diffusers' call defaults are the medium preset


@pytest.mark.parametrize("setting,message", [
    ("extreme", "safety guidance 'extreme': choose a preset"),
    ({"sld_guidance": 5}, "unknown setting 'sld_guidance'"),
    ({"threshold": 0.1, "sld_threshold": 0.2}, "threshold is given twice"),
    ({"warmup_steps": "7"}, "warmup_steps must be a number"),
    (7, "must be None, a preset name or a dict"),
])
def test_bad_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        sld_config(setting)


def test_sdxl_and_a_concept_without_sld_are_refused():
    with pytest.raises(ValueError, match="guidance_hook is implemented for SD 1 / 2, not SDXL"):
        tiny_pipeline("sdxl").generate(["a"], steps=1, guidance_hook=sld_hook("max"), progress=False)
    with pytest.raises(ValueError, match="safety_concept is the concept of safety_guidance, which is not set"):
        sld_hook(None, "a cat")
    assert sld_hook(None) is None
    assert isinstance(sld_config("max"), SLDConfig)


def test_sample_command_writes_the_setting_into_each_png(model, tmp_path):
    from mini_safediff import sample
    from mini_safediff.images import read_png_text

    sample.main(["--model", str(model), "--prompt", "a cat", "--n", "1", "--sampling-steps", "2", "--device", "cpu",
                 "--safety-guidance", '{"sld_guidance_scale": 50}', "--safety-concept", "a dog", "--out",
                 str(tmp_path), "--quiet"])
    text = read_png_text(tmp_path / "0000-a-cat.png")
    assert text["safety_guidance"] == '{"sld_guidance_scale": 50}' and text["safety_concept"] == "a dog"


def test_evaluate_row_with_sld_records_it(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import evaluate
    from mini_safediff.models.pipeline import BUILTIN_MODEL

    common = ["--model", f"base={BUILTIN_MODEL}", "--n", "1", "--n-harmful", "1", "--sampling-steps", "2", "--device", "cpu"]
    evaluate.main([*common, "--model", f"sld={BUILTIN_MODEL}", "--safety-guidance", "sld=max", "--out",
                   str(tmp_path)])
    base, sld = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert "safety_guidance" not in base
    assert sld["safety_guidance"] == "max" and sld["safety_concept"] == DEFAULT_SAFETY_CONCEPT
    with pytest.raises(ValueError, match="no --model row is named 'other'"):
        evaluate.main([*common, "--safety-guidance", "other=max", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):  # argparse: the setting is checked when parsed
        evaluate.main([*common, "--safety-guidance", "base=extreme", "--out", str(tmp_path / "bad")])
