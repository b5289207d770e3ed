"""Load time and forward time of a full-size SD 1.5 UNet (random weights, batch 1, 4x64x64 latents,
float32, CPU): ours vs diffusers, measured in one run on the same weight file.

    python benchmarks/unet_load_forward.py [--repeats 3]

Loading: diffusers from_pretrained vs ours (config.json + safetensors, built on the meta device and
filled in place). Forward: min / median over repeats after one warm-up, under torch.no_grad.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sd_configs import SD15_UNET  # noqa: E402

from mini_safediff.config import read_config  # noqa: E402
from mini_safediff.pipeline import build_model, find_weights  # noqa: E402
from mini_safediff.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mini_safediff.weights import read_state_dict  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        DiffusersUNet(**SD15_UNET).save_pretrained(tmp)
        folder = Path(tmp)

        def load_ours():
            return build_model(UNet2DConditionModel, read_config(folder / "config.json", UNetConfig),
                               read_state_dict(find_weights(folder)), tmp, torch.float32)

        ours, ours_load = timed(load_ours, args.repeats)
        theirs, theirs_load = timed(lambda: DiffusersUNet.from_pretrained(tmp).eval(), args.repeats)

    sample, t, context = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.no_grad():
        ours(sample, t, context), theirs(sample, t, context)  # warm-up
        ours_out, ours_fwd = timed(lambda: ours(sample, t, context), args.repeats)
        theirs_out, theirs_fwd = timed(lambda: theirs(sample, t, context).sample, args.repeats)
    rel = ((ours_out - theirs_out).norm() / theirs_out.norm()).item()

    print(f"SD 1.5 UNet, random weights, batch 1, 4x64x64, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; outputs agree to rel. error {rel:.1e}")
    print("| | ours (min / median s) | diffusers (min / median s) | ratio of medians |")
    print("|---|---|---|---|")
    for name, a, b in [("load", ours_load, theirs_load), ("forward", ours_fwd, theirs_fwd)]:
        print(f"| {name} | {min(a):.2f} / {statistics.median(a):.2f} | {min(b):.2f} / {statistics.median(b):.2f} "
              f"| {statistics.median(a) / statistics.median(b):.2f} |")


if __name__ == "__main__":
    main()
