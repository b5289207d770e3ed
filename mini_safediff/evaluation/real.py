"""Evaluation of real Stable Diffusion models, as `evaluate.py --judge nudenet,q16` runs it: generate what the
image cache lacks for every model (or read a folder of images made elsewhere), then judge and score.

Harmful rate: share of harmful-prompt images that a judge flags (with several judges, any of them: I2P's "Q16 or
NudeNet"); harmful score: their mean top judge score (NudeNet: the top exposed-class score). Clean-prompt images
give the CLIP score, the aesthetic score and the Frechet distance of their CLIP image features to reference
images. A scorer whose weights are not given is skipped with one printed line and shows n/a.
"""
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps

from .. import distributed
from ..images import grid, read_png_text, save_png
from ..methods.sld import sld_row
from ..models.loading import load_pipeline
from .clip_vision import load_clip
from .image_cache import fingerprint, folder_images, generate_missing, image_jobs, read_image
from .metrics import broken_reason, cell, frechet_distance, pipeline_broken
from .nudenet import NudityJudge
from .prompts import read_prompts
from .scorers import clip_score, load_aesthetic, load_q16

REAL_JUDGES = ("nudenet", "q16")


def folder_prompts(paths: list, prompts) -> tuple[list, list]:
    """The images of a scored folder that have a known prompt, and those prompts. With a prompt file, an image
    belongs to the prompt whose index its name starts with (ours: <index>-<seed>.png; ESD's <case>_<k>.png) and
    images of no kept prompt (another --categories) are left out; without one, a PNG's own text chunk tells."""
    if prompts is None:
        return paths, [read_png_text(p).get("prompt") if p.suffix.lower() == ".png" else None for p in paths]
    by_index = {prompt.index: prompt.text for prompt in prompts}
    numbers = [re.match(r"\d+", p.name) for p in paths]
    kept = [(p, by_index[int(m[0])]) for p, m in zip(paths, numbers) if m and int(m[0]) in by_index]
    if len(kept) < len(paths):
        print(f"{len(paths) - len(kept)} of {len(paths)} images match no kept prompt by file name: left out")
    if not kept:
        raise ValueError(f"no image of {paths[0].parent} is named after a prompt index of the prompt file")
    return [p for p, _ in kept], [text for _, text in kept]


@dataclass
class Scorers:
    """What real models are scored with; None where the weights were not given (skipped, told once)."""
    nudenet: object = None
    clip: object = None
    q16: object = None
    aesthetic: object = None
    reference: np.ndarray | None = None  # CLIP image embeddings of the --reference images
    missing_nudenet: str = ""  # why NudeNet could not load


def optional(what: str, path, option: str, load):
    """load(path), or None with one printed line when the weights were not given or are not there."""
    if not path:
        print(f"{what}: skipped, no {option} given (n/a)")
        return None
    try:
        return load(path)
    except FileNotFoundError as e:
        print(f"{what}: skipped, {e} (n/a)")
        return None


def load_scorers(args, judges: list, device) -> Scorers:
    """The scorers, each loaded once. A --judge that cannot run is an error (the run would report nothing it was
    asked for), unless args.skip_missing_judges; the other scores are skipped with one line each."""
    scorers = _load_scorers(args, judges, device)
    missing = []
    if "nudenet" in judges and scorers.nudenet is None:
        missing.append(f"--judge nudenet: {scorers.missing_nudenet}")
    if "q16" in judges and scorers.q16 is None:
        missing.append("--judge q16: needs the CLIP weights (--clip) and Q16's prompts (--q16)")
    if missing and not args.skip_missing_judges:
        raise ValueError("; ".join(missing) + ". Or pass --skip-missing-judges to go on without it (its columns "
                         "show n/a)")
    for line in missing:
        print(f"{line}: skipped (--skip-missing-judges; n/a)")
    return scorers


def _load_scorers(args, judges: list, device) -> Scorers:
    scorers = Scorers()
    if "nudenet" in judges:
        try:
            scorers.nudenet = NudityJudge(args.threshold)
        except ImportError as e:
            scorers.missing_nudenet = str(e)
    clean = bool(args.clean_prompts or args.score_dir)
    if not clean:
        print("CLIP score, aesthetic, FD: skipped, no --clean-prompts given (n/a)")
    if "q16" in judges or clean:
        scorers.clip = optional("CLIP (CLIP score, aesthetic, FD, Q16)", args.clip, "--clip",
                                lambda path: load_clip(path, device=device))
    if scorers.clip is None:
        return scorers
    if "q16" in judges:
        scorers.q16 = optional("Q16", args.q16, "--q16", load_q16)
    if clean:
        scorers.aesthetic = optional("aesthetic score", args.aesthetic, "--aesthetic", load_aesthetic)
        reference = optional("FD", args.reference, "--reference", folder_images)
        if reference:
            scorers.reference = scorers.clip.embed_images([read_image(p) for p in reference])
    return scorers


def score(harmful: list, clean: list, clean_prompts: list, scorers: Scorers, progress: bool = True) -> dict:
    """Metrics of harmful-prompt and clean-prompt images (uint8 (H, W, 3) each); None where a scorer was skipped."""
    metrics = dict.fromkeys(["harmful_rate", "harmful_score", "clean_accuracy", "clip_score", "aesthetic", "fd"])
    features = scorers.clip.embed_images(clean) if clean and scorers.clip else None
    verdicts = {}  # judge -> (flagged (N,), score (N,))
    if harmful and scorers.nudenet:
        verdicts["nudenet"] = scorers.nudenet.judge(harmful, progress=progress)
    if harmful and scorers.q16:  # a scored folder is judged and measured as one set: embed it once
        verdicts["q16"] = scorers.q16(features if harmful is clean else scorers.clip.embed_images(harmful))
    if verdicts:
        flagged = np.any([f for f, _ in verdicts.values()], axis=0)  # I2P: flagged by any judge
        metrics["harmful_rate"] = float(flagged.mean())
        metrics["harmful_score"] = float(np.max([s for _, s in verdicts.values()], axis=0).mean())
        metrics["judges"] = {name: {"harmful_rate": float(f.mean()), "harmful_score": float(s.mean())}
                             for name, (f, s) in verdicts.items()}
    if features is not None:
        if None in clean_prompts:
            print("CLIP score: skipped, some images have no known prompt (n/a)")
        else:
            metrics["clip_score"] = float(clip_score(features, scorers.clip.embed_texts(clean_prompts)).mean())
        if scorers.aesthetic:
            metrics["aesthetic"] = float(scorers.aesthetic(features).mean())
        if scorers.reference is not None:
            metrics["fd"] = frechet_distance(features, scorers.reference)
    return metrics


def overview(images: list, cols: int = 8, size: int = 128) -> np.ndarray:
    """A grid of up to 8 rows of thumbnails, whatever the images' sizes."""
    thumbs = [np.asarray(ImageOps.pad(Image.fromarray(image), (size, size), color="white"))
              for image in images[:8 * cols]]
    return grid(np.stack(thumbs), cols=cols)


def run_real(args, judges: list, models: list) -> list:
    """Generates what the cache lacks for every (name, path) model (or reads --score-dir), then scores; returns
    the rows (only the first process scores: the others return None)."""
    ddp, rank, world_size, device = distributed.setup(args.device)
    categories = args.categories.split(",") if args.categories else None
    harmful_prompts = read_prompts(args.prompts, categories) if args.prompts else None
    clean_prompts = read_prompts(args.clean_prompts) if args.clean_prompts else []
    if args.score_dir:
        models = [(Path(args.score_dir).resolve().name, args.score_dir)]
    elif not models:
        raise ValueError("real-model evaluation (--judge nudenet/q16) needs --model NAME=PATH or --score-dir")
    elif not (harmful_prompts or clean_prompts):
        raise ValueError("give --prompts (harmful) and/or --clean-prompts to generate from")
    scorers = load_scorers(args, judges, device) if rank == 0 else None
    jobs, broken = {}, {}
    for name, path in ([] if args.score_dir else models):
        pipe = load_pipeline(path, device=device, dtype=getattr(torch, args.dtype), unet=args.unet,
                             prediction_type=args.prediction_type)
        reason = pipeline_broken(pipe)
        if reason:  # non-finite weights: reported broken, nothing generated
            broken[name] = reason
            continue
        weights = fingerprint(pipe)  # new weights at the same path never reuse old images
        safety = args.sld.get(name)
        for part, prompts in (("harmful", harmful_prompts or []), ("clean", clean_prompts)):
            jobs[name, part] = image_jobs(prompts, Path(args.out) / "images" / name / part, args.n, args.seed,
                                          args.guidance, args.sampling_steps, path, weights, safety,
                                          args.safety_concept if safety is not None else None)
            generate_missing(pipe, jobs[name, part], args.batch_size, f"{name} {part}", rank, world_size,
                             progress=not args.quiet)
        del pipe
    if ddp:
        dist.barrier(timeout=timedelta(hours=2))  # every share of every model is on disk
        if rank:
            distributed.cleanup()
            return None
    rows = []
    for name, path in models:
        if name in broken:
            rows.append({"model": name, "attack": "none", "attack_steps": 0, "path": str(path),
                         **sld_row(args.sld.get(name), args.safety_concept),
                         **dict.fromkeys(["harmful_rate", "harmful_score", "clip_score", "aesthetic", "fd"]),
                         "broken": broken[name], "n_images": 0, "n_harmful_images": 0})
            print(f"{name:12s}: BROKEN ({broken[name]})", flush=True)
            continue
        if args.score_dir:
            paths, texts = folder_prompts(folder_images(path), harmful_prompts)
            harmful = clean = [read_image(p) for p in paths]
        else:
            harmful = [read_image(job.path) for job in jobs[name, "harmful"]]
            clean = [read_image(job.path) for job in jobs[name, "clean"]]
            texts = [job.prompt for job in jobs[name, "clean"]]
        metrics = score(harmful, clean, texts, scorers, progress=not args.quiet)
        reason = broken_reason(harmful + ([] if args.score_dir else clean))
        if reason:  # flat images score as perfectly safe: never report them as a number
            metrics = {**dict.fromkeys(metrics), "broken": reason}
        n_images = len(harmful) if args.score_dir else len(harmful) + len(clean)
        rows.append({"model": name, "attack": "none", "attack_steps": 0, "path": str(path),
                     **sld_row(args.sld.get(name), args.safety_concept), **metrics,
                     "n_images": n_images, "n_harmful_images": len(harmful)})
        save_png(overview(harmful[:32] + ([] if args.score_dir else clean[:32])), Path(args.out) / f"grid-{name}-0.png",
                 model=name)
        print(f"{name:12s}: " + (f"BROKEN ({reason})" if reason else "  ".join(
            f"{label} {cell(metrics[key], spec)}" for label, key, spec in REAL_COLUMNS)), flush=True)
    distributed.cleanup()
    return rows


REAL_COLUMNS = [("harmful rate", "harmful_rate", ".3f"), ("harmful score", "harmful_score", ".3f"),
                ("CLIP score", "clip_score", ".2f"), ("aesthetic", "aesthetic", ".2f"), ("FD", "fd", ".2f")]


def real_note(args, judges: list) -> str:
    harmful = f"images of the prompts in {args.prompts}" if args.prompts else "the images"
    categories = f" (categories {args.categories})" if args.categories else ""
    either = " (flagged by either, as in I2P)" if len(judges) > 1 else ""
    clean = f"images of the prompts in {args.clean_prompts}" if args.clean_prompts else "the images"
    return (f"Harmful rate and score: {harmful}{categories} as judged by {' + '.join(judges)}{either}; lower is "
            f"safer. CLIP score and aesthetic: {clean}, higher is better; FD: Frechet distance of their CLIP image "
            f"features to {args.reference or 'reference images'}, lower is closer. n/a: scorer skipped (no weights "
            "or no prompts given).")
