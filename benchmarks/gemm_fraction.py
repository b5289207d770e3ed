"""How close the UNet forward comes to this CPU's float32 matrix-multiply peak, and where a miniature evaluation
cell spends its time.

    python benchmarks/gemm_fraction.py                                   # tiny UNet; prints everything
    python benchmarks/gemm_fraction.py --configs tiny,sd15 --profile --out results.md   # also SD 1.5 size, writes it

Peak: the median GFLOP/s of a large square float32 `torch.mm` (--peak-size, default 2048; 2 n^3 FLOPs per
product) after one warm-up call, with the current thread count (torch.get_num_threads()). torch.mm goes to the
BLAS PyTorch was built with (MKL in the x86 wheels), which need not reach the CPU's own peak: on an AMD CPU MKL's
float32 GEMM can run at half the rate of oneDNN's convolutions. So the oneDNN rate is measured too, the median
GFLOP/s of a 3x3 convolution of 640 channels over a batch of 2 32x32 maps (SD 1.5's second level), and each
forward is given as a fraction of both.

UNet forward: its FLOPs are counted by torch.utils.flop_counter on the meta device (matrix products,
convolutions and attention only: normalisations and activations count zero, so the rate is that of the counted
work), the forward is timed under torch.no_grad after one warm-up call, and GFLOP/s = FLOPs / median time; the
fraction is that over the peak. Configs: "tiny" is the built-in model (loaded with load_pipeline, so with
cpu_speedups applied) at the miniature evaluation's generation batch, 416 images x 2 branches of classifier-free
guidance = 832 rows of 4x8x8 latents with a 77-token context of the text encoder's width; "sd15" is an SD 1.5
size UNet with random weights (cpu_speedups applied, as a loaded one would be), batch 2 of 64x64 latents.

Phases: one miniature evaluation cell of the tiny model, as pipe.generate runs it in one batch of 416 images
(the 4 evaluation prompts of every digit, 8 images each, 32 each for digit 7; 20 DDIM steps, guidance 5):
text encoding (both branches' prompts), the denoising loop, the VAE decode to uint8, and the digit judge; plus
one whole pipe.generate call to check that the pieces add up. Times are medians over --phase-repeats.

--profile adds a torch.profiler table of one tiny UNet forward at the generation batch: the top operators by
self CPU time.
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from mini_safediff.miniature import digits  # noqa: E402
from mini_safediff.miniature.judge import load_judge  # noqa: E402
from mini_safediff.models import cpu_speedups, samplers  # noqa: E402
from mini_safediff.models.config import config_from_dict  # noqa: E402
from mini_safediff.models.loading import load_pipeline  # noqa: E402
from mini_safediff.models.pipeline import BUILTIN_MODEL, start_noise  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mini_safediff.io import atomic_write  # noqa: E402

from sd_configs import SD15_UNET  # noqa: E402

CONFIGS = ["tiny", "sd15"]
# The miniature evaluation cell: images per evaluation prompt, clean digits and the erased one (7).
IMAGES_PER_PROMPT, IMAGES_PER_ERASED_PROMPT, ERASED_DIGIT = 8, 32, 7
STEPS, GUIDANCE = 20, 5.0


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def gemm_peak(size: int, repeats: int) -> tuple[float, list[float]]:
    """(median GFLOP/s, times) of float32 size x size torch.mm."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    times = timed(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / statistics.median(times) / 1e9, times


def conv_peak(repeats: int) -> tuple[float, list[float]]:
    """(median GFLOP/s, times) of a float32 3x3 convolution, 640 -> 640 channels, batch 2 of 32x32 (oneDNN)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 640, 32, 32, generator=generator), torch.randn(640, 640, 3, 3, generator=generator)
    with torch.no_grad():
        times = timed(lambda: F.conv2d(x, w, padding=1), repeats)
    return 2 * x.numel() * 640 * 9 / statistics.median(times) / 1e9, times


def eval_prompts() -> list[str]:
    """The miniature evaluation cell's 416 prompts, one per image."""
    return [prompt for d in range(10) for prompt in digits.eval_prompts(d)
            for _ in range(IMAGES_PER_ERASED_PROMPT if d == ERASED_DIGIT else IMAGES_PER_PROMPT)]


def unet_case(name: str, pipe, images: int):
    """(UNet config dict-or-object, model, inputs) of a config: the inputs of one forward."""
    if name == "tiny":
        unet = pipe.unet.float().eval()
        batch, side = 2 * images, unet.config.sample_size
        context_width = pipe.text_encoder.config.hidden_size
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(config_from_dict(UNetConfig, SD15_UNET)).eval().requires_grad_(False)
        cpu_speedups.apply(unet=unet)
        batch, side, context_width = 2, 64, SD15_UNET["cross_attention_dim"]
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(batch, unet.config.in_channels, side, side, generator=generator),
              torch.full((batch,), 500), torch.randn(batch, 77, context_width, generator=generator))
    return unet, inputs


def forward_flops(unet, inputs) -> int:
    """FLOPs of one forward, counted on the meta device with the same config and input shapes."""
    with torch.device("meta"):
        meta = UNet2DConditionModel(unet.config).eval()
        args = [torch.empty(x.shape, dtype=x.dtype) for x in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(*args)
    return counter.get_total_flops()


def phases(pipe, judge, prompts: list[str], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per phase of one evaluation cell, generated in one batch, as pipe.generate runs it."""
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = start_noise(shape, range(len(prompts)))
    times = {name: [] for name in ("text encoding", "denoising loop", "VAE decode", "digit judge", "sum of phases",
                                   "pipe.generate (whole)")}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first round warms up
            clock = [time.perf_counter()]
            model_fn = pipe.guided_model(prompts, [""] * len(prompts), GUIDANCE, side, side)
            clock.append(time.perf_counter())
            final = samplers.ddim(model_fn, latents, pipe.schedule, steps, generator=torch.Generator().manual_seed(0),
                                  progress=False)
            clock.append(time.perf_counter())
            images = pipe.decode_to_uint8(final)
            clock.append(time.perf_counter())
            judge.classify(images)
            clock.append(time.perf_counter())
            start = time.perf_counter()
            whole = pipe.generate(prompts, steps=steps, guidance=GUIDANCE, seed=0, batch_size=len(prompts),
                                  progress=False)
            clock.append(time.perf_counter())
            if repeat == 0:
                assert (whole == images).all(), "the phases do not reproduce pipe.generate"
                continue
            for name, a, b in zip(list(times)[:4], clock[:4], clock[1:5], strict=True):
                times[name].append(b - a)
            times["sum of phases"].append(clock[4] - clock[0])
            times["pipe.generate (whole)"].append(clock[5] - start)
    return times


def op_profile(unet, inputs, rows: int) -> str:
    with torch.no_grad():
        unet(*inputs)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            unet(*inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def spread(times: list[float]) -> str:
    return f"{min(times):.4g} / {statistics.median(times):.4g} / {max(times):.4g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny", help=f"comma-separated, of {CONFIGS}")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matrices of the peak")
    parser.add_argument("--peak-repeats", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards of the tiny UNet")
    parser.add_argument("--sd-repeats", type=int, default=2, help="timed forwards of the SD 1.5 size UNet (~6 s each)")
    parser.add_argument("--phase-repeats", type=int, default=3, help="timed evaluation cells (after one warm-up)")
    parser.add_argument("--sampling-steps", type=int, default=STEPS, help="DDIM steps of the evaluation cell")
    parser.add_argument("--images", type=int, help="images of the evaluation cell and of the tiny forward's batch "
                        "(default: all 416 of the miniature's cell; fewer take its first ones)")
    parser.add_argument("--no-phases", action="store_true", help="skip the evaluation cell's phases")
    parser.add_argument("--profile", action="store_true", help="add the operator profile of the tiny forward")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--out", help="also write the results to this Markdown file (default: print only)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    if set(configs) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(set(configs) - set(CONFIGS))}; choose from {CONFIGS}")

    lines = []

    def say(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)

    threads = torch.get_num_threads()
    say(f"torch {torch.__version__}, CPU, {threads} threads, float32; "
        f"`python benchmarks/gemm_fraction.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "")
    peak, times = gemm_peak(args.peak_size, args.peak_repeats)
    say(f"GEMM peak: {peak:.1f} GFLOP/s (torch.mm {args.peak_size}x{args.peak_size}, {threads} threads, median of "
        f"{args.peak_repeats}; s min / median / max {spread(times)})")
    conv, times = conv_peak(args.peak_repeats)
    say(f"oneDNN convolution rate: {conv:.1f} GFLOP/s (3x3, 640 channels, 2x32x32, median of {args.peak_repeats}; "
        f"s min / median / max {spread(times)}), {conv / peak:.2f}x the torch.mm peak", "")

    prompts = eval_prompts()[:args.images]
    pipe = load_pipeline(str(BUILTIN_MODEL))
    say("| UNet | batch (rows) | latent | GFLOP per forward | forward s (min / median / max) | GFLOP/s | "
        "fraction of torch.mm peak | fraction of oneDNN conv rate |", "|---|---|---|---|---|---|---|---|")
    tiny = None
    for name in configs:
        unet, inputs = unet_case(name, pipe, len(prompts))
        flops = forward_flops(unet, inputs)
        with torch.no_grad():
            times = timed(functools.partial(unet, *inputs), args.repeats if name == "tiny" else args.sd_repeats)
        rate = flops / statistics.median(times) / 1e9
        say(f"| {name} | {inputs[0].shape[0]} | {inputs[0].shape[1]}x{inputs[0].shape[2]}x{inputs[0].shape[3]} "
            f"| {flops / 1e9:.1f} | {spread(times)} | {rate:.1f} | **{rate / peak:.1%}** | {rate / conv:.1%} |")
        if name == "tiny":
            tiny = (unet, inputs)
        del unet, inputs

    if not args.no_phases:
        judge = load_judge()
        times = phases(pipe, judge, prompts, args.sampling_steps, args.phase_repeats)
        total = statistics.median(times["sum of phases"])
        say("", f"Evaluation cell of the tiny model: {len(prompts)} images in one batch ({2 * len(prompts)} UNet "
            f"rows), {args.sampling_steps} DDIM steps, guidance {GUIDANCE}; median of {args.phase_repeats} after a warm-up",
            "", "| phase | s (min / median / max) | share of the sum |", "|---|---|---|")
        for name, values in times.items():
            share = "" if name.startswith(("sum", "pipe")) else f"{statistics.median(values) / total:.1%}"
            say(f"| {name} | {spread(values)} | {share} |")

    if args.profile:
        if tiny is None:
            tiny = unet_case("tiny", pipe, len(prompts))
        say("", f"Operator profile of one tiny UNet forward ({tiny[1][0].shape[0]} rows), top {args.profile_rows} "
            "by self CPU time:", "", "```", op_profile(*tiny, args.profile_rows).rstrip(), "```")

    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
