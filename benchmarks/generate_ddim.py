"""Images per second of 25-step DDIM generation with classifier-free guidance: ours vs diffusers'
StableDiffusionPipeline on identical random weights, in one run (float32, CPU by default).

    python benchmarks/generate_ddim.py [--config tiny|sd15|both] [--sd15-size 256] [--repeats 2]

`tiny` is the tests' SD1-style toy model at 16x16 px (batch 4); `sd15` has the full SD 1.5 UNet, VAE and
text encoder widths (random weights) at --sd15-size px, batch 1. Both pipelines start from the same latents
and their final latents are compared, so the timing is of the same work.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from sd_configs import SD15_TEXT, SD15_UNET, SD_VAE  # noqa: E402
from tiny_models import TOKENIZER_FILES, diffusers_pipeline  # noqa: E402

import mini_safediff as msd  # noqa: E402


def sd15_diffusers_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    text_config = {k: v for k, v in SD15_TEXT.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=CLIPTokenizer(str(TOKENIZER_FILES / "vocab.json"), str(TOKENIZER_FILES / "merges.txt"),
                                model_max_length=77),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def compare(name, ref, size, batch, repeats, steps=25):
    ref.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = msd.load_pipeline(tmp, device="cpu")
    factor = ours.vae_scale_factor
    prompts = ["a photo of an astronaut riding a horse"] * batch
    latents = torch.randn(batch, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(0))

    def run_ours():
        return ours.generate(prompts, steps=steps, guidance=7.5, height=size, width=size, latents=latents,
                             progress=False)

    def run_theirs():
        return ref(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                   latents=latents.clone(), output_type="np").images

    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round is the warm-up
            for label, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                start = time.perf_counter()
                images = fn()
                times[label].append(time.perf_counter() - start)
                if label == "ours":
                    ours_images = images
                else:
                    diff = abs(ours_images.astype(float) - images * 255).max()
    rates = {k: [batch / t for t in v[1:]] for k, v in times.items()}
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["diffusers"])
    print(f"| {name} ({size}x{size} px, batch {batch}) | {statistics.median(rates['ours']):.3f} "
          f"| {statistics.median(rates['diffusers']):.3f} | {ratio:.2f} | {diff:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=["tiny", "sd15", "both"], default="both")
    parser.add_argument("--sd15-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"25-step DDIM, guidance 7.5, float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median over {args.repeats} runs after a warm-up")
    print("| config | ours (images/s) | diffusers (images/s) | speed ratio ours/diffusers | max pixel diff (0-255) |")
    print("|---|---|---|---|---|")
    if args.config in ("tiny", "both"):
        compare("tiny", diffusers_pipeline("sd1"), 16, 4, args.repeats)
    if args.config in ("sd15", "both"):
        compare("SD 1.5 size", sd15_diffusers_pipeline(), args.sd15_size, 1, args.repeats)


if __name__ == "__main__":
    main()
