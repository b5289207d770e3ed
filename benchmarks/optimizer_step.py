"""Seconds per optimizer step on the SD 1.5 UNet's weights (859.5M, random): train.py's optimizers vs torch's default.

    python benchmarks/optimizer_step.py                  # CPU, ~3 minutes
    python benchmarks/optimizer_step.py --device cuda

Rows: torch.optim.AdamW with its defaults (a loop over tensors on the CPU, foreach on CUDA), train.py's plain
optimizer (`training.adamw`: torch's fused AdamW) and `--adam-bf16` (AdamWBF16, stochastic rounding). Each row
gets fresh weights and gradients, one untimed step (which creates the state), then --repeats timed steps.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from mini_safediff.models.config import config_from_dict  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mini_safediff.training.optim import adamw  # noqa: E402

from sd_configs import SD15_UNET  # noqa: E402

OPTIMIZERS = {
    "torch.optim.AdamW, defaults": lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01),
    "train.py (fused AdamW)": lambda params: adamw(params, 1e-5, 0.01),
    "train.py --adam-bf16 (AdamWBF16)": lambda params: adamw(params, 1e-5, 0.01, bf16_state=True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    with torch.device("meta"):
        shapes = [p.shape for p in UNet2DConditionModel(config_from_dict(UNetConfig, SD15_UNET)).parameters()]
    print(f"{sum(s.numel() for s in shapes) / 1e6:.1f}M weights in {len(shapes)} tensors, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| optimizer | s / step (min / median / max) |\n|---|---|")
    for name, make in OPTIMIZERS.items():
        params = [torch.nn.Parameter(torch.randn(shape, device=device)) for shape in shapes]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = make(params)
        optimizer.step()
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"| {name} | {min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} |", flush=True)
        del params, optimizer


if __name__ == "__main__":
    main()
