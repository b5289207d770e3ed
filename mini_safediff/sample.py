"""Generate images from a prompt.

    python -m mini_safediff.sample --model PATH --prompt "a photo of a cat" --n 4 --out out/

Images smaller than 128 px (the built-in model's 16x16 digits) are saved scaled up, nearest neighbour, so that
they can be looked at; --native-size saves them at the model's own size.
"""
import json
import re
import sys
from pathlib import Path

import torch

from . import cli
from .evaluation.metrics import pipeline_broken
from .images import save_grid, save_png
from .methods.sld import DEFAULT_SAFETY_CONCEPT, sld_hook
from .models.loading import load_pipeline
from .models.pipeline import BUILTIN_MODEL, DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def make_parser():
    p = cli.make_parser(__doc__)
    cli.add_model_options(p)
    p.add_argument("--prompt", action="append", required=True, type=cli.text,
                   help="a prompt; may be given several times")
    p.add_argument("--negative-prompt", type=cli.text,
                   help="what guidance steers away from (default: none: SD 1/2 guide away from the empty prompt, "
                        "SDXL from zero embeddings, as diffusers does)")
    p.add_argument("--safety-guidance", type=cli.safety_guidance, help=cli.SAFETY_GUIDANCE_HELP + " (default: off)")
    p.add_argument("--safety-concept", type=cli.text,
                   help="what --safety-guidance steers away from (default: SLD's own concept, I2P's categories in "
                        "words)")
    p.add_argument("--n", type=cli.positive_int, default=4, help="images per prompt")
    p.add_argument("--sampling-steps", type=cli.positive_int, default=DEFAULT_STEPS, help="sampler steps")
    p.add_argument("--guidance", type=cli.finite_float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="the sampling method")
    p.add_argument("--eta", type=cli.non_negative_float, default=0.0, help="DDIM eta: 0 is deterministic")
    p.add_argument("--height", type=cli.positive_int, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=cli.positive_int, help="image width in pixels (default: the model's size)")
    p.add_argument("--batch-size", type=cli.positive_int, help="images per batch (default: all at once)")
    p.add_argument("--native-size", action="store_true", help="save small images at the model's own size")
    p.add_argument("--out", default="out", type=cli.out_folder, help="folder for the PNGs and grid.png")
    cli.add_quiet(p)
    cli.add_other_name(p, "--steps", "--sampling-steps", cli.SAMPLING_STEPS_WHY)
    return p


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    args.model = args.model or str(BUILTIN_MODEL)
    return args


def warn_if_broken(model: str, pipe, images) -> None:
    """Non-finite weights decode to black: saved without a word, such images look like a model's answer."""
    reason = pipeline_broken(pipe, images)
    if reason:
        print(f"warning: {model}: {reason}: the model is broken, its images are blank", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype), unet=args.unet,
                         prediction_type=args.prediction_type)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = pipe.generate(prompts, negative_prompt=args.negative_prompt, steps=args.sampling_steps, guidance=args.guidance,
                           seed=args.seed, height=args.height, width=args.width, sampler=args.sampler, eta=args.eta,
                           batch_size=args.batch_size, progress=not args.quiet,
                           guidance_hook=sld_hook(args.safety_guidance, args.safety_concept))
    warn_if_broken(args.model, pipe, images)
    out = Path(args.out)
    safety = ({"safety_guidance": json.dumps(args.safety_guidance),
               "safety_concept": args.safety_concept or DEFAULT_SAFETY_CONCEPT} if args.safety_guidance else {})
    scale_up = not args.native_size
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        save_png(image, out / f"{i:04d}-{slug(prompt)}.png", scale_up=scale_up, prompt=prompt, seed=args.seed + i,
                 model=args.model, steps=args.sampling_steps, guidance=args.guidance, sampler=args.sampler,
                 **safety)
    save_grid(images, out / "grid.png", cols=args.n, scale_up=scale_up, prompts=" | ".join(args.prompt),
              seed=args.seed, rows=args.prompt if scale_up else None)  # native size: the bare grid, for code
    print(f"wrote {len(images)} images and grid.png to {out}/")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input or weights, a missing file, a full or read-only disk: one line
        sys.exit(f"sample: {e}")
    except KeyboardInterrupt:
        sys.exit("\nsample: interrupted; no image was written")
