"""Training-step time and peak memory: our UNet vs diffusers' UNet2DConditionModel doing the same
eps-MSE step (forward, backward, AdamW step) on identical weights and inputs, float32, CPU.

    python benchmarks/train_step.py [--config medium|sd15] [--latent 32] [--batch 2] [--repeats 5]

One invocation measures both: the weights are drawn once and saved, then each side runs in a fresh
subprocess so that its peak resident memory (ru_maxrss of the whole process: Python, torch, model,
gradients, AdamW state, activations) is its own.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sd_configs import SD15_UNET  # noqa: E402

CONFIGS = {
    "medium": {**SD15_UNET, "block_out_channels": [64, 128, 256, 256], "attention_head_dim": 4},
    "sd15": SD15_UNET,
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(side: str, config: dict, weights: str, latent: int, batch: int, repeats: int) -> dict:
    from safetensors.torch import load_file

    if side == "ours":
        from mini_safediff.config import config_from_dict
        from mini_safediff.pipeline import build_model
        from mini_safediff.unet import UNet2DConditionModel, UNetConfig

        unet = build_model(UNet2DConditionModel, config_from_dict(UNetConfig, config), load_file(weights), weights,
                           torch.float32).requires_grad_(True)
    else:
        from diffusers import UNet2DConditionModel as DiffusersUNet

        unet = DiffusersUNet(**config)
        unet.load_state_dict(load_file(weights))
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch, 4, latent, latent, generator=generator)
    noise = torch.randn(batch, 4, latent, latent, generator=generator)
    context = torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    times = []
    for _ in range(repeats + 1):  # the first step (optimizer state allocation) is the warm-up
        start = time.perf_counter()
        out = unet(x_t, t, context)
        out = out if side == "ours" else out.sample
        loss = (out - noise).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"times": times[1:], "peak_mib": peak_mib(), "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # the subprocesses
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, CONFIGS[args.config], args.weights, args.latent, args.batch, args.repeats)))
        return
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from safetensors.torch import save_file

    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/unet.safetensors"
        save_file(DiffusersUNet(**CONFIGS[args.config]).state_dict(), weights)
        for side in ("ours", "diffusers"):
            command = [sys.executable, __file__, "--side", side, "--weights", weights, "--config", args.config,
                       "--latent", str(args.latent), "--batch", str(args.batch), "--repeats", str(args.repeats)]
            results[side] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout
                                       .strip().splitlines()[-1])
    ours, theirs = results["ours"], results["diffusers"]
    print(f"UNet training step ({args.config} config, batch {args.batch}, 4x{args.latent}x{args.latent}, float32, "
          f"AdamW, {torch.get_num_threads()} threads, torch {torch.__version__}); median of {args.repeats} steps "
          f"after a warm-up; losses {ours['loss']:.6f} / {theirs['loss']:.6f}")
    print("| | ours | diffusers | ratio ours/diffusers |")
    print("|---|---|---|---|")
    a, b = statistics.median(ours["times"]), statistics.median(theirs["times"])
    print(f"| step time (s) | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"| peak resident memory (MiB) | {ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} "
          f"| {ours['peak_mib'] / theirs['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
