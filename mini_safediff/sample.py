"""Generate images from a prompt.

    python -m mini_safediff.sample --model PATH --prompt "a photo of a cat" --n 4 --out out/
"""
import argparse
import re
from pathlib import Path

import torch

from .images import grid, save_png
from .models.config import ConfigError
from .models.pipeline import BUILTIN_MODEL, SAMPLERS, load_pipeline
from .models.weights import WeightsError


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN_MODEL), help="diffusers folder or single file (default: built-in)")
    parser.add_argument("--unet", help="UNet weights loaded over the model (folder or file)")
    parser.add_argument("--prompt", action="append", required=True, help="may be given several times")
    # none given: SD 1 / 2 guide away from the empty prompt, SDXL from zero embeddings (as diffusers)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    try:
        pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype), unet=args.unet)
    except (WeightsError, ConfigError) as e:
        parser.error(str(e))
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = pipe.generate(prompts, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, height=args.height, width=args.width, sampler=args.sampler, eta=args.eta,
                           batch_size=args.batch_size)
    out = Path(args.out)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        save_png(image, out / f"{i:04d}-{slug(prompt)}.png", prompt=prompt, seed=args.seed + i,
                 model=args.model, steps=args.steps, guidance=args.guidance, sampler=args.sampler)
    save_png(grid(images, cols=args.n), out / "grid.png", prompts=" | ".join(args.prompt), seed=args.seed)
    print(f"wrote {len(images)} images and grid.png to {out}/")


if __name__ == "__main__":
    main()
