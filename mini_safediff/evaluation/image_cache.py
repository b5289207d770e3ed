"""Resumable generation for evaluate.py: every image it needs is a PNG named by (prompt index, seed) in a model's
image folder, carrying what made it (prompt, seed, guidance, steps, model path and a fingerprint of the model's
weights) in its text chunk. An image already there with the same recipe is reused (new weights at the same path
make new images) and only the batches that lack one are generated, so a crashed run of
thousands of images continues where it stopped, making the batches an uninterrupted run makes (on a deterministic
device, the same images to the bit); each PNG is written atomically, so a half-written file never counts as done.

    jobs = image_jobs(read_prompts("i2p.csv"), Path("results/images/sd14/harmful"), n=1, seed=0, guidance=7.5,
                      steps=50, model="stable-diffusion-v1-4", weights=fingerprint(pipe))
    generate_missing(pipe, jobs, batch_size=8)    # only what the folder lacks
    images = [read_image(job.path) for job in jobs]
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..images import read_png_text, save_png
from ..methods.sld import sld_hook
from ..models import pipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageJob:
    """One image an evaluation needs: the PNG it is cached in and everything that makes it."""
    path: Path
    prompt: str
    seed: int
    guidance: float
    steps: int
    model: str
    weights: str  # fingerprint(pipe) of the model that makes it
    safety_guidance: str | dict | None = None  # Safe Latent Diffusion's setting (methods/sld.py), None: off
    safety_concept: str | None = None  # its concept, None: SLD's default

    def text(self) -> dict:
        """The PNG text chunk: a cached image is reused only if all of it matches."""
        sld = ({"safety_guidance": json.dumps(self.safety_guidance), "safety_concept": str(self.safety_concept)}
               if self.safety_guidance is not None else {})
        return {"prompt": self.prompt, "seed": str(self.seed), "guidance": str(self.guidance),
                "steps": str(self.steps), "model": self.model, "weights": self.weights, **sld}

    def is_cached(self) -> bool:
        try:
            return read_png_text(self.path) == self.text()
        except (OSError, SyntaxError):  # absent, or not a PNG that Pillow reads
            return False


def fingerprint(pipe) -> str:
    """SHA-256 over every weight (names, dtypes, shapes, bytes) of the UNet, VAE and text encoder, the scheduler
    config and the tokenizer's padding: what decides the images besides the recipe. About 1 s a GB of weights."""
    digest = hashlib.sha256()
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, tensor in sorted(part.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(repr(sorted(asdict(pipe.schedule.config).items())).encode())
    digest.update(repr(pipe.tokenizer(["fingerprint"]).tolist()).encode())
    return digest.hexdigest()[:16]


def image_jobs(prompts, folder: Path, n: int, seed: int, guidance: float, steps: int, model,
               weights: str, safety_guidance=None, safety_concept=None) -> list[ImageJob]:
    """n images a prompt (prompts.Prompt); image j of a prompt gets its row's seed (I2P) or seed + n * index, plus
    j, and its row's guidance or `guidance`; all with Safe Latent Diffusion's safety_guidance when it is set."""
    jobs = []
    for prompt in prompts:
        first = prompt.seed if prompt.seed is not None else seed + n * prompt.index
        scale = prompt.guidance if prompt.guidance is not None else guidance
        jobs += [ImageJob(Path(folder) / f"{prompt.index:05d}-{first + j}.png", prompt.text, first + j, scale, steps,
                          str(model), weights, safety_guidance, safety_concept) for j in range(n)]
    return jobs


def start_noise(pipe, seeds) -> torch.Tensor:
    """The starting noise that pipe.generate draws for an image of seed s, for a batch of any seeds."""
    size = pipe.unet.config.sample_size
    return pipeline.start_noise((pipe.unet.config.in_channels, size, size), seeds)


def batches(jobs: list, batch_size: int) -> list[list[ImageJob]]:
    """Fixed chunks of the jobs of each (guidance, steps). The last bits of an image depend on the batch it is
    made in (float round-off), so a resumed or shared run must make the very batches an uninterrupted one makes."""
    groups = {}
    for job in jobs:
        groups.setdefault((job.guidance, job.steps), []).append(job)
    return [group[start:start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


def generate_missing(pipe, jobs: list, batch_size: int = 8, desc: str = "generate", rank: int = 0,
                     world_size: int = 1, progress: bool = True) -> int:
    """Makes every batch that lacks an image, of this process's share of them (every world_size-th batch); each
    PNG is written as soon as its batch is done. Returns how many images it made."""
    todo = [batch for batch in batches(jobs, batch_size)[rank::world_size] if not all(j.is_cached() for j in batch)]
    with tqdm(total=sum(map(len, todo)), desc=desc, disable=not (todo and progress)) as bar:
        for batch in todo:
            images = pipe.generate([job.prompt for job in batch], steps=batch[0].steps, guidance=batch[0].guidance,
                                   latents=start_noise(pipe, [job.seed for job in batch]), progress=False,
                                   guidance_hook=sld_hook(batch[0].safety_guidance, batch[0].safety_concept))
            for job, image in zip(batch, images):
                save_png(image, job.path, scale_up=False, **job.text())  # scoring reads them back
            bar.update(len(batch))
    return sum(map(len, todo))


def read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def folder_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    # regular files only: a folder named x.png is no image, and reading a FIFO would wait forever
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{folder}: holds no PNG or JPEG image")
    return paths
