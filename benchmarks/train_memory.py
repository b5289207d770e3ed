"""Peak memory of train.py itself on an SD 1.5-size model at 512 px, batch 1: the 24 GB recipe, measured.

    python benchmarks/train_memory.py --out benchmarks/results-cpu-train-memory.md       # CPU, ~15 minutes
    python benchmarks/train_memory.py --device cuda --out benchmarks/results-cuda-train-memory.md

Each variant (a set of train.py flags) runs `train.train()` for --steps steps in a fresh process, on an
SD 1.5-size pipeline with random weights (same shapes as the published one; written once to --workdir) and
four random 512x512 images (two clean, two harmful). Reported per variant:

- peak tensor memory: the most tensor memory alive at once over the whole run (loading, training, saving).
  On CUDA the caching allocator's peak counter; on the CPU the PyTorch profiler's record of every
  allocation and free (profile_memory). Neither counts the CUDA context, allocator caches or the Python heap;
- max RSS: the process's resident memory at its peak (CPU runs: everything, Python and file buffers too);
- seconds per training step (from train.py's log; on the CPU, bf16 autocast is slow: a memory run, not a speed run).

On the CPU, train.py's defaults are float32 and no gradient checkpointing, so the variants name both.
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from components import peak_memory  # noqa: E402

from mini_safediff.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from mini_safediff.models.config import config_from_dict  # noqa: E402
from mini_safediff.models.pipeline import Pipeline  # noqa: E402
from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig  # noqa: E402
from mini_safediff.models.tokenizer import CLIPTokenizer  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mini_safediff.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from mini_safediff.io import atomic_write  # noqa: E402

from sd_configs import SD15_TEXT, SD15_UNET, SD_SCHEDULER, SD_VAE  # noqa: E402

RECIPE = "--dtype bfloat16 --gradient-checkpointing --adam-bf16"
VARIANTS = {
    "recipe (bf16 autocast, checkpointing, --adam-bf16)": RECIPE,
    "recipe with plain AdamW": "--dtype bfloat16 --gradient-checkpointing",
    "recipe without checkpointing": "--dtype bfloat16 --no-gradient-checkpointing --adam-bf16",
    "float32, no checkpointing, plain AdamW": "--dtype float32 --no-gradient-checkpointing",
}
GIB = 2**30


def write_model_and_data(workdir: Path) -> tuple[Path, Path]:
    """An SD 1.5-size diffusers folder with random weights and a four-image 512 px dataset (kept for reuse)."""
    model, data = workdir / "sd15-random", workdir / "data-512"
    if not (model / "model_index.json").is_file():
        torch.manual_seed(0)
        Pipeline(unet=UNet2DConditionModel(config_from_dict(UNetConfig, SD15_UNET, "SD15_UNET")),
                 vae=AutoencoderKL(config_from_dict(VAEConfig, SD_VAE, "SD_VAE")),
                 text_encoder=CLIPTextModel(config_from_dict(CLIPTextConfig, SD15_TEXT, "SD15_TEXT")),
                 tokenizer=CLIPTokenizer.default(),
                 schedule=NoiseSchedule(config_from_dict(SchedulerConfig, SD_SCHEDULER, "SD_SCHEDULER"))).save(model)
    if not (data / "metadata.jsonl").is_file():
        from PIL import Image

        data.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for i, label in enumerate([1, 2, 1, 2]):
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(data / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo, number {i}", "class": label}))
        (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return model, data


def measure_run(train_argv: list[str], device: str) -> dict:
    """In this process: train.train(train_argv) and its peak tensor memory, max RSS and step time."""
    import train

    args = train.parse_args(train_argv + ["--device", device, "--quiet"])
    peak, _ = peak_memory(lambda: train.train(args), torch.device(device))  # nothing allocated yet: all of it
    log = [json.loads(line) for line in (Path(args.out) / "log.jsonl").read_text().splitlines()]
    step_seconds = (log[-1]["seconds"] - log[0]["seconds"]) / max(len(log) - 1, 1)
    return {"peak_bytes": peak, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": step_seconds}


def run_variants(model, data, variants: list[str], device: str, steps: int, workdir: Path):
    """Yields measure_run's result for each variant (train.py flags as one string), each in a fresh process."""
    for flags in variants:
        run = Path(workdir) / "run"
        shutil.rmtree(run, ignore_errors=True)  # a run writes ~12 GB (checkpoint, model folder, single file)
        train_argv = ["--model", str(model), "--data", str(data), "--batch-size", "1", "--steps", str(steps),
                      "--checkpoint-every", str(steps), "--out", str(run), *flags.split()]
        child = subprocess.run([sys.executable, __file__, "--device", device, "--child", json.dumps(train_argv)],
                               capture_output=True, text=True)
        shutil.rmtree(run, ignore_errors=True)
        if child.returncode:
            sys.exit(f"train.py {flags} failed:\n{child.stderr[-3000:]}")
        yield json.loads(child.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variants", help="comma-separated numbers of VARIANTS (default: all), e.g. 1,4")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mini_safediff-train-memory"))
    p.add_argument("--out", help="Markdown file for the table (default: print only)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON train.py argv: measure one run, print JSON
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_run(json.loads(args.child), args.device)))
        return

    workdir = Path(args.workdir)
    model, data = write_model_and_data(workdir)
    chosen = list(VARIANTS.items())
    if args.variants:
        chosen = [chosen[int(i) - 1] for i in args.variants.split(",")]
    rows = []
    for (name, flags), result in zip(chosen, run_variants(model, data, [flags for _, flags in chosen], args.device,
                                                          args.steps, workdir)):
        rows.append(f"| {name} | `{flags}` | {result['peak_bytes'] / GIB:.2f} | {result['max_rss_bytes'] / GIB:.2f} "
                    f"| {result['step_seconds']:.1f} |")
        print(rows[-1], flush=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    table = "\n".join([
        f"train.py on an SD 1.5-size UNet (859.5M parameters), 512 px, batch 1, {args.steps} steps, {device_name}, "
        f"torch {torch.__version__}; `python benchmarks/train_memory.py --device {args.device} --steps {args.steps}`",
        "",
        "| variant | train.py flags | peak tensor memory (GiB) | max RSS (GiB) | s / step |",
        "|---|---|---|---|---|", *rows, ""])
    print(table)
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(table))


if __name__ == "__main__":
    main()
