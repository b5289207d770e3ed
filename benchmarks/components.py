"""Ours vs diffusers / transformers, component by component, timed in one process on the same weights.

    python benchmarks/components.py --config tiny --out results.md    # CPU, float32; prints the table, writes it too
    python benchmarks/components.py --config both --repeats 5          # tiny and SD 1.5 size
    python benchmarks/components.py --device cuda --config sd15        # + bf16, channels_last, torch.compile

Rows: UNet forward, UNet training step (forward, MSE, backward; the optimizer step, the same code on both
sides, is left out; also with gradient checkpointing), VAE encode and decode, text encoder, and a 25-step
DDIM generation with classifier-free guidance (tokenizer, text encoder, UNet, VAE decode, as the pipelines
run them).

Same work on both sides: the reference (diffusers / transformers, random weights) is built first and ours
is built on its parameter tensors themselves, so the weights are identical and stored once; "rel. diff" is
the relative difference of the two outputs. After warm-up the sides alternate repeat by repeat (which side
goes first swaps each repeat) so that machine noise hits both alike. Times are min / median / max over the
repeats; ratio = ours / reference of the medians (below 1: ours is faster).

Peak memory is the most tensor memory a call allocates above what was allocated when it started (for the
training step: gradients and the activations kept for backward). On CUDA it is read from the caching
allocator's peak counter, on the CPU from the PyTorch profiler's record of every allocation and free
(profile_memory), in one extra call per side so that the profiler's overhead stays out of the timings. Neither counts allocator caches or the Python heap.

On CUDA the variants are float32, bf16 (inference in bf16 weights; training with bf16 autocast over
float32 weights, as train.py does), bf16 + channels_last and bf16 + torch.compile; the training rows also
give samples/s and the model FLOPs utilisation (forward + backward FLOPs counted by
torch.utils.flop_counter on the meta device, over --peak-tflops). On a shared machine, --cpu-time times
with this process's CPU time instead of the wall clock (meaningful with one thread only).
"""
import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import mini_safediff as msd  # noqa: E402
from mini_safediff.models import cpu_speedups  # noqa: E402
from mini_safediff.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from mini_safediff.models.config import config_from_dict  # noqa: E402
from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig  # noqa: E402
from mini_safediff.models.tokenizer import CLIPTokenizer  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mini_safediff.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from mini_safediff.io import atomic_write  # noqa: E402

from sd_configs import SD15_TEXT, SD15_UNET, SD_VAE  # noqa: E402


def builtin(part: str) -> dict:
    return json.loads((msd.models.pipeline.BUILTIN_MODEL / part / "config.json").read_text())


# latent: side of the latents (images are vae-factor times larger); batch: images (UNet, VAE), prompts.
CONFIGS = {
    "tiny": lambda: dict(unet=builtin("unet"), vae=builtin("vae"), text=builtin("text_encoder"), latent=8, batch=8),
    "medium": lambda: dict(unet={**SD15_UNET, "block_out_channels": [64, 128, 256, 256], "attention_head_dim": 4},
                           vae={**SD_VAE, "block_out_channels": [32, 64, 128, 128]}, text=SD15_TEXT,
                           latent=32, batch=2),
    "sd15": lambda: dict(unet=SD15_UNET, vae=SD_VAE, text=SD15_TEXT, latent=64, batch=1),
}
COMPONENTS = ["unet-forward", "unet-train", "unet-train-checkpointing", "vae-encode", "vae-decode", "text-encoder",
              "generate"]
# Dense bf16 tensor-core peaks (TFLOP/s) by device name, for the MFU column.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "L4": 121, "4090": 165}
GPU_VARIANTS = "fp32,bf16,bf16+channels_last,bf16+compile"
PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclass
class Case:
    name: str
    ours: Callable  # one call of the work; returns the output to compare
    reference: Callable
    grad: bool = False


def twin(ours_class, config, reference, prefix=""):
    """Our model on the reference's own parameter tensors (names equal up to `prefix`)."""
    with torch.device("meta"):
        ours = ours_class(config)
    params = dict(reference.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    missing = {name.removeprefix(prefix) for name in names} ^ params.keys()
    assert not missing, f"parameter names differ: {sorted(missing)[:5]}"
    for name in names:
        module, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(module), attr, params[name.removeprefix(prefix)])
    return ours.train(reference.training)


def reference_model(part: str, config: dict):
    torch.manual_seed(0)
    if part == "text":
        from transformers import CLIPTextConfig as RefConfig
        from transformers import CLIPTextModel as RefModel

        return RefModel(RefConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                                                  "torch_dtype", "_class_name")}))
    from diffusers import AutoencoderKL as RefVAE
    from diffusers import UNet2DConditionModel as RefUNet

    return (RefUNet if part == "unet" else RefVAE).from_config(config)


def models(part: str, config: dict, variant: set, device, dtype):
    """(ours, reference) for "unet", "vae" or "text", on the device, in the dtype and memory format."""
    reference = reference_model(part, config[part]).eval().requires_grad_(False).to(device, dtype)
    if "channels_last" in variant and part != "text":
        reference.to(memory_format=torch.channels_last)
    ours_class, config_class, prefix = {"unet": (UNet2DConditionModel, UNetConfig, ""),
                                        "vae": (AutoencoderKL, VAEConfig, ""),
                                        "text": (CLIPTextModel, CLIPTextConfig, "text_model.")}[part]
    ours = twin(ours_class, config_from_dict(config_class, config[part]), reference, prefix)
    if torch.device(device).type == "cpu":  # as load_pipeline gives them to a user
        cpu_speedups.apply(**{part: ours} if part in ("unet", "vae") else {})
    return ours, reference


def compiled(model, part: str, variant: set):
    if "compile" not in variant:
        return model
    if part == "vae":  # encode / decode are methods: compile the networks they call
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
        return model
    return torch.compile(model)


def make_case(component: str, config: dict, variant: set, device) -> Case:
    bf16 = "bf16" in variant
    dtype = torch.bfloat16 if bf16 and component not in ("unet-train", "unet-train-checkpointing") else torch.float32
    memory_format = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    batch, latent = config["batch"], config["latent"]
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if component.startswith("unet"):
        ours, ref = models("unet", config, variant, device, dtype)
        sample = randn(batch, ours.config.in_channels, latent, latent).contiguous(memory_format=memory_format)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        context = randn(batch, 77, ours.config.cross_attention_dim)
        if component == "unet-forward":
            ours, ref = compiled(ours, "unet", variant), compiled(ref, "unet", variant)
            return Case(component, lambda: ours(sample, t, context), lambda: ref(sample, t, context).sample)
        ours.train().requires_grad_(True)
        ref.train()
        if component == "unet-train-checkpointing":
            ours.gradient_checkpointing = True
            ref.enable_gradient_checkpointing()
        noise = randn(batch, ours.config.out_channels, latent, latent)
        ours, ref = compiled(ours, "unet", variant), compiled(ref, "unet", variant)

        def step(model, unwrap):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.mse_loss(unwrap(model(sample, t, context)).float(), noise)
            loss.backward()
            ref.zero_grad(set_to_none=True)  # the sides share the parameters, so this clears both
            return loss.detach()
        return Case(component, lambda: step(ours, lambda out: out), lambda: step(ref, lambda out: out.sample),
                    grad=True)

    factor = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    if component.startswith("vae"):
        ours, ref = (compiled(model, "vae", variant) for model in models("vae", config, variant, device, dtype))
        if component == "vae-encode":
            images = (randn(batch, 3, latent * factor, latent * factor).clamp(-1, 1)
                      .contiguous(memory_format=memory_format))
            return Case(component, lambda: ours.encode(images).mean, lambda: ref.encode(images).latent_dist.mean)
        latents = randn(batch, 4, latent, latent).contiguous(memory_format=memory_format)
        return Case(component, lambda: ours.decode(latents), lambda: ref.decode(latents).sample)

    tokenizer = CLIPTokenizer.default()
    if component == "text-encoder":
        ours, ref = (compiled(model, "text", variant) for model in models("text", config, variant, device, dtype))
        ids = tokenizer([PROMPT] * batch).to(device)
        return Case(component, lambda: ours(ids), lambda: ref(ids).last_hidden_state)

    from diffusers import StableDiffusionPipeline

    from tiny_models import reference_ddim, reference_tokenizer

    parts = {part: models(part, config, variant, device, dtype) for part in ("unet", "vae", "text")}
    ours = msd.Pipeline(unet=compiled(parts["unet"][0], "unet", variant), vae=compiled(parts["vae"][0], "vae", variant),
                        text_encoder=compiled(parts["text"][0], "text", variant), tokenizer=tokenizer,
                        schedule=NoiseSchedule(SchedulerConfig()))
    ref = StableDiffusionPipeline(
        unet=compiled(parts["unet"][1], "unet", variant), vae=compiled(parts["vae"][1], "vae", variant),
        text_encoder=compiled(parts["text"][1], "text", variant),
        tokenizer=reference_tokenizer(), scheduler=reference_ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # distinct prompts: ours encodes each distinct prompt once, so repeating one would flatter ours
    prompts, size = [f"{PROMPT}, take {i}" for i in range(batch)], latent * factor
    latents = randn(batch, 4, latent, latent).contiguous(memory_format=memory_format)

    def run_ours():
        images = ours.generate(prompts, steps=25, guidance=7.5, height=size, width=size, latents=latents,
                               progress=False)
        return torch.from_numpy(images).float() / 255

    def run_reference():  # to uint8 as ours, the way diffusers' numpy_to_pil does it
        images = ref(prompt=prompts, num_inference_steps=25, guidance_scale=7.5, height=size, width=size,
                     latents=latents.clone(), output_type="np").images
        return torch.from_numpy((images * 255).round().astype("uint8")).float() / 255
    return Case(component, run_ours, run_reference)


def peak_memory(fn, device):
    """(bytes, fn's output): the most allocated during fn() above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        output = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, output
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        output = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0)), output


def measure(case: Case, device, repeats: int, warmup: int, clock) -> dict:
    sides = {"ours": case.ours, "reference": case.reference}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    with torch.set_grad_enabled(case.grad):
        for _ in range(warmup):
            for fn in sides.values():
                fn()
        # The memory call (with no warm-up also the first call, which warms up) gives the outputs compared.
        measured = {side: peak_memory(fn, device) for side, fn in sides.items()}  # side -> (bytes, output)
        memory = {side: nbytes for side, (nbytes, _) in measured.items()}
        a, b = (output.float() for _, output in measured.values())
        rel_diff = ((a - b).norm() / b.norm()).item()
        times = {side: [] for side in sides}
        for repeat in range(repeats):
            for side in list(sides)[::1 if repeat % 2 == 0 else -1]:
                sync()
                start = clock()
                sides[side]()
                sync()
                times[side].append(clock() - start)
    return {"times": times, "memory": memory, "rel_diff": rel_diff}


def train_flops(config: dict) -> int:
    """FLOPs of one UNet forward + backward at this config's batch and latent size."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(config_from_dict(UNetConfig, config["unet"])).train()
        b, side = config["batch"], config["latent"]
        sample = torch.randn(b, unet.config.in_channels, side, side)
        context = torch.randn(b, 77, unet.config.cross_attention_dim)
        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, torch.zeros(b), context).square().mean().backward()
    return counter.get_total_flops()


def row(config_name: str, variant: str, name: str, result: dict) -> str:
    def spread(times):
        return f"{min(times):.4g} / {statistics.median(times):.4g} / {max(times):.4g}"
    ours, ref = result["times"]["ours"], result["times"]["reference"]
    memory = {side: result["memory"][side] / 2**20 for side in ("ours", "reference")}
    memory_ratio = f"{memory['ours'] / memory['reference']:.2f}" if memory["reference"] else "-"
    return (f"| {config_name} | {name} | {variant} | {spread(ours)} | {spread(ref)} "
            f"| **{statistics.median(ours) / statistics.median(ref):.2f}** | {memory['ours']:.1f} / "
            f"{memory['reference']:.1f} | {memory_ratio} | {result['rel_diff']:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["tiny", "medium", "sd15", "both", "all"], default="both",
                        help="both = tiny and sd15; all adds medium (SD 1.5 layout, small widths)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--components", default=",".join(COMPONENTS), help=f"comma-separated, of {COMPONENTS}")
    parser.add_argument("--variants", help="comma-separated, each fp32 or bf16, optionally joined with +channels_last "
                        f"and/or +compile (default: fp32 on CPU, {GPU_VARIANTS} on CUDA)")
    parser.add_argument("--latent", type=int, help="latent side (default per config: tiny 8, medium 32, sd15 64)")
    parser.add_argument("--batch", type=int, help="images or prompts (default per config: tiny 8, medium 2, sd15 1)")
    parser.add_argument("--warmup", type=int, help="calls per side before the memory call and the timed repeats "
                        "(default 1, 3 with torch.compile); 0 makes the memory call the warm-up")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time, not wall clock")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--out", help="also write the table to this Markdown file (default: print only)")
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # its advice on casting with .to() is for loading, not this
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    components = args.components.split(",")
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        parser.error(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    variants = (args.variants or (GPU_VARIANTS if device.type == "cuda" else "fp32")).split(",")
    bad = [v for v in variants if not set(v.split("+")) <= {"fp32", "bf16", "channels_last", "compile"}]
    if bad:
        parser.error(f"unknown variants {bad}: write fp32 or bf16, optionally +channels_last and/or +compile")
    if args.cpu_time and device.type == "cuda":
        parser.error("--cpu-time measures CPU work only; GPU kernels run outside it")
    clock = time.process_time if args.cpu_time else time.perf_counter
    names = {"both": ["tiny", "sd15"], "all": ["tiny", "medium", "sd15"]}.get(args.config, [args.config])
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)

    lines = [f"Ours / diffusers {diffusers.__version__} and transformers {transformers.__version__}, "
             f"torch {torch.__version__}, {device_name}; "
             f"{args.repeats} repeats after warm-up, times in seconds ({'CPU' if args.cpu_time else 'wall'} clock) "
             f"as min / median / max; `python benchmarks/components.py {' '.join(sys.argv[1:])}`", "",
             "| config | component | variant | ours (s) | reference (s) | time ratio | peak memory MiB "
             "(ours / reference) | memory ratio | rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    print("\n".join(lines), flush=True)
    for config_name in names:
        config = CONFIGS[config_name]()
        config.update({k: v for k, v in (("latent", args.latent), ("batch", args.batch)) if v})
        for variant, component in itertools.product(variants, components):
            flags = set(variant.split("+"))
            result = measure(make_case(component, config, flags, device), device, args.repeats,
                             warmup=args.warmup if args.warmup is not None else 3 if "compile" in flags else 1,
                             clock=clock)
            lines.append(row(f"{config_name} (batch {config['batch']}, latent {config['latent']})", variant,
                             component, result))
            print(lines[-1], flush=True)
            if component.startswith("unet-train") and device.type == "cuda":
                flops = train_flops(config)
                speeds = []
                for side, times in result["times"].items():
                    tflops = flops / statistics.median(times) / 1e12
                    speeds.append(f"{side} {config['batch'] / statistics.median(times):.2f} samples/s, "
                                  f"{tflops:.1f} TFLOP/s" + (f", MFU {tflops / peak:.1%}" if peak else ""))
                notes.append(f"- {config_name} {component} {variant}: {flops / 1e12:.3f} TFLOP per step; "
                             + "; ".join(speeds))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if notes:
        lines += ["", f"Training throughput (MFU over {peak} TFLOP/s dense bf16):" if peak else "Training throughput:",
                  *notes]
        print("\n".join(lines[-len(notes) - 1:]))
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
