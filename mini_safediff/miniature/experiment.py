"""The judging of a model's generations with the digit classifier: for the `python evaluate.py --model ...` rows
here, and for every cell of the study (study.py, runner.py).

Metrics per row: harmful rate (share of harmful-prompt images the judge reads as a harmful digit: the paper's IP),
harmful score (mean judge probability of the harmful digits: the NSFW-score analogue), clean accuracy (share of
clean-prompt images read as the prompted digit: the CLIP-score analogue) and the Frechet distance between judge
features of clean generations and of real clean digits (FID's analogue).
"""
from pathlib import Path

import numpy as np
import torch

from ..evaluation.metrics import (frechet_distance, harmful_rate, harmful_score, markdown_table, pipeline_broken,
                                  prompt_accuracy)
from ..images import save_grid
from ..methods.sld import sld_hook, sld_row
from ..models.loading import load_pipeline
from . import digits
from .judge import load_judge

def judged_generations(pipe, judge, harmful_digits, n: int, n_harmful: int, steps: int, guidance: float, seed: int,
                       safety_guidance=None, safety_concept=None, progress: bool = False) -> dict:
    """Generate every evaluation prompt, n images each (n_harmful for a harmful digit's), and judge them. Image j
    of prompt i gets seed `seed + n_i * i + j` along the prompt list: every model sees the same starting noise.
    Returns per image: "prompted" digit, judge "probs" and "features", "images" (uint8), and "broken" (a reason
    or None, evaluation.metrics.pipeline_broken)."""
    prompts, prompted = [], []
    for digit in range(10):
        for prompt in digits.eval_prompts(digit):
            count = n_harmful if digit in harmful_digits else n
            prompts += [prompt] * count
            prompted += [digit] * count
    images = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed, batch_size=256, progress=progress,
                           guidance_hook=sld_hook(safety_guidance,
                                                  safety_concept if safety_guidance is not None else None))
    probs, features = judge.classify(images)
    return {"prompted": np.array(prompted), "probs": probs, "features": features, "images": images,
            "broken": pipeline_broken(pipe, images)}


def real_clean_features(judge, harmful_digits) -> np.ndarray:
    """Judge features of the real clean digits of the generator's part (the judge never trained on them, so its
    features are unbiased): the reference of the Frechet distance."""
    real_images, real_labels = digits.digits("generator")
    return judge.classify(real_images[~np.isin(real_labels, harmful_digits)])[1]


def evaluate_model(path, judge, harmful_digits, real_features, args, safety_guidance=None):
    """The metrics of one --model row, and images and a column count for a grid with a row per digit."""
    pipe = load_pipeline(path, device=args.device, dtype=getattr(torch, args.dtype), unet=args.unet,
                         prediction_type=args.prediction_type)
    judged = judged_generations(pipe, judge, harmful_digits, args.n, args.n_harmful, args.sampling_steps,
                                args.guidance, args.seed, safety_guidance, args.safety_concept, progress=not args.quiet)
    prompted, probs, features, images = (judged[k] for k in ("prompted", "probs", "features", "images"))
    is_harmful = np.isin(prompted, harmful_digits)
    clean = ~is_harmful
    metrics = {"harmful_rate": harmful_rate(probs[is_harmful], harmful_digits),
               "harmful_score": harmful_score(probs[is_harmful], harmful_digits),
               "clean_accuracy": prompt_accuracy(probs[clean], prompted[clean]),
               "fd": frechet_distance(features[clean], real_features), "n_images": len(images),
               "n_harmful_images": int(is_harmful.sum())}
    if judged["broken"]:  # never a number: a broken model's blank images would score as perfectly safe
        metrics.update(dict.fromkeys(["harmful_rate", "harmful_score", "clean_accuracy", "fd"]),
                       broken=judged["broken"])
    cols = min(16, min(args.n, args.n_harmful) * len(digits.eval_prompts(0)))
    per_digit = np.concatenate([images[prompted == digit][:cols] for digit in range(10)])  # (10 * cols, H, W, 3)
    return metrics, per_digit, cols


MINIATURE_COLUMNS = [("harmful rate", "harmful_rate", ".3f"), ("harmful score", "harmful_score", ".3f"),
                     ("clean accuracy", "clean_accuracy", ".3f"), ("FD", "fd", ".2f")]


def run_miniature(args, models: list) -> tuple[list, str]:
    """Rows and results table of the built-in digit prompts for the (name, path) models, judged by the digit
    classifier."""
    harmful_digits = args.harmful_digits
    judge = load_judge(device=args.device)
    real_features = real_clean_features(judge, harmful_digits)
    rows = []
    for name, path in models:
        metrics, picture, cols = evaluate_model(path, judge, harmful_digits, real_features, args, args.sld.get(name))
        rows.append({"model": name, "attack": "none", "attack_steps": 0, "path": path,
                     **sld_row(args.sld.get(name), args.safety_concept), **metrics})
        save_grid(picture, Path(args.out) / f"grid-{name}-0.png", cols=cols, model=name,
                  rows=digits.row_labels(harmful_digits), title=name)
        print(f"{name:12s}: " + (f"BROKEN ({metrics['broken']})" if metrics.get("broken") else
              f"harmful rate {metrics['harmful_rate']:.3f}  clean accuracy {metrics['clean_accuracy']:.3f}  "
              f"FD {metrics['fd']:.2f}"), flush=True)
    note = (f"Harmful concept: digit(s) {', '.join(map(str, harmful_digits))}. Harmful rate and score: lower is "
            "safer; clean accuracy: higher is better; FD: lower is closer to real digits.")
    return rows, markdown_table(rows, note, MINIATURE_COLUMNS)
