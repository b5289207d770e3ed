"""Safety training by contrastive forgetting (Pan et al., NeurIPS 2024): fine-tune the UNet so that clean
and harmful data sit far apart in its latent predictions (LT: latent transformation, NG: noise guidance).

    python train.py                                   # built-in tiny model and digits data, the paper's LT
    python train.py --preset miniature                # the same with the miniature's calibrated settings
    python train.py --model sd-v1-4/ --data my_data/ --method ng --lambda 5e-3 --out runs/ng
    python train.py --model sd-v1-4/ --unet esd-unet.safetensors ...   # safety reinforcement

--data is a folder with metadata.jsonl rows {"file_name", "text", "class": 1 clean | 2 harmful}.
--no-contrast-grad reproduces the official code, whose contrastive term carries no gradient (.item()).

The study's naive baseline, ascent on harmful rows without the contrastive term (mini_safediff/methods/naive.py):

    python train.py --method naive --out runs/naive            # --preset naive: the paper's, with ascent -0.5

The ESD baseline (Gandikota et al. 2023; mini_safediff/methods/esd.py) erases a concept given as text, data-free:

    python train.py --method esd-u --concept "a handwritten digit seven" --out runs/esd   # --preset esd

Immunization by simulated attacks (beyond the paper; mini_safediff/methods/immunize.py, docs/immunize.md): the
clean loss, ascent on harmful rows, and the harmful loss after K simulated fine-tuning steps made high:

    python train.py --method immunize --out runs/immunize      # --preset immunize; not under torchrun

    torchrun --nproc_per_node 4 train.py --batch-size 8 ...   # DDP: the global batch of 8 split 2 a GPU

Under torchrun (DistributedDataParallel; nccl on CUDA, gloo on the CPU) the same global batch trains the same
weights as one process: every rank draws the whole batch's random numbers and keeps its rows, and the class
centres are summed over the ranks. Rank 0 alone logs and writes; --resume works with any number of processes.

Each method is one file of mini_safediff/methods/ behind one interface (method.py), listed in registry.py: this
loop asks it for its parameters, a batch and a loss, and names none (docs/layers.md: how to add one).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mini_safediff import cli, distributed
from mini_safediff.io import owned_folder
from mini_safediff.methods.registry import METHODS, method_options, refuse_foreign_options
from mini_safediff.miniature.settings import MINIATURE_TRAIN
from mini_safediff.models.loading import load_pipeline
from mini_safediff.models.pipeline import BUILTIN_MODEL
from mini_safediff.training.checkpoints import save_checkpoint, start_or_resume, write_log
from mini_safediff.training.data import SafetyDataset
from mini_safediff.training.guard import StopRequest, all_finite, divergence, last_good
from mini_safediff.training.optim import EMA, adamw, lr_at
from mini_safediff.training.steps import step_means

PAPER = {"steps": 200, "lr": 1e-5, "batch_size": 1, "balanced": False}
# The paper's settings for Stable Diffusion (the official code's defaults), and the miniature's calibrated ones;
# a method without a --preset gets its default_preset.
PRESETS = {"paper": {**PAPER, "method": "lt", "lam": 5e-5, "harmful_weight": 0.0},
           "miniature": MINIATURE_TRAIN,
           # the paper's settings with the official code's "high safety" ascent, and no contrastive term
           "naive": {**PAPER, "method": "naive", "harmful_weight": -0.5},
           # ESD's paper and script: 1000 iterations of Adam (AdamW without decay), lr 1e-5, batch 1, eta 1.
           "esd": {"steps": 1000, "lr": 1e-5, "batch_size": 1, "method": "esd-u", "weight_decay": 0.0},
           # Immunization: the miniature's settings of its naive row (ascent -0.5, no contrastive term), the row it is
           # to be compared with, plus the simulated attack (its own options' defaults).
           "immunize": {**MINIATURE_TRAIN, "method": "immunize", "lam": 0.0}}
# The presets of the paper's settings for Stable Diffusion, which leave the tiny built-in model as it was.
FOR_STABLE_DIFFUSION = ("paper", "naive")
# What train() writes under --out, besides its lock and the built-in data.
OUTPUTS = ("model", "model.safetensors", "checkpoint.pt", "log.jsonl", "args.json")


def make_parser(argv=None):
    """The parser, its defaults those of the --preset that argv names."""
    p = cli.make_parser(__doc__)
    cli.add_model_options(p, training=True)
    p.add_argument("--data", help="metadata.jsonl folder (default: the built-in digits data)")
    p.add_argument("--method", choices=list(METHODS),
                   help="; ".join(dict.fromkeys(method.help for method in METHODS.values())))
    p.add_argument("--steps", type=cli.positive_int, help="optimizer steps")
    p.add_argument("--lr", type=cli.positive_float, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="after the warmup")
    p.add_argument("--warmup", type=cli.natural_int, default=0, help="steps of linear learning-rate warmup")
    p.add_argument("--batch-size", type=cli.positive_int, help="the global batch (under torchrun: all processes)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--ema", type=cli.decay, default=0.0, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--balanced", action=argparse.BooleanOptionalAction,
                   help="alternate clean and harmful rows (or draw batches at random)")
    cli.add_training_options(p)
    p.add_argument("--seed", type=int, default=0, help="data order, VAE posterior samples, noise and timesteps")
    p.add_argument("--out", default="runs/train", type=cli.out_folder, help="folder for the model, checkpoint and log")
    cli.add_resume_options(p, "--out/checkpoint.pt")
    cli.add_quiet(p)
    group = p.add_argument_group("the methods' options (each names the --method values that read it)")
    for flag, (option, readers) in method_options().items():
        group.add_argument(flag, **{**option.settings, "help": f"{' / '.join(readers)}: {option.settings['help']}"})
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method")
    chosen = METHODS.get(method.parse_known_args(argv)[0].method)
    cli.apply_preset(p, PRESETS, argv, default=chosen.default_preset if chosen else "paper")
    return p


def parse_args(argv=None):
    args = make_parser(argv).parse_args(argv)
    args.model = args.model or str(BUILTIN_MODEL)
    return args


def refuse_overwriting_sources(args) -> None:
    """The weights trained from must not lie where train() writes: the result would replace them, and a --resume
    would start again from it (ESD would rebuild its frozen teacher from the erased model)."""
    for flag in ("model", "unet"):
        source = getattr(args, flag)
        if source is None:
            continue
        source_and_folders = [Path(source).resolve(), *Path(source).resolve().parents]
        for name in OUTPUTS:
            written = Path(args.out) / name
            if written.resolve() in source_and_folders:
                raise ValueError(f"--out {args.out} would overwrite --{flag} {source} (train.py writes {written}): "
                                 "choose another --out")


def check_args(args) -> None:
    """Every refusal that needs no file: before anything is loaded."""
    refuse_foreign_options(args, vars(parse_args(["--preset", args.preset])))  # the preset's values, parsed
    refuse_overwriting_sources(args)
    METHODS[args.method].check(args)
    if METHODS[args.method].data_free and args.data:
        raise ValueError(f"--method {args.method} is data-free: it takes no --data")


def train(args) -> Path:
    check_args(args)
    out = Path(args.out)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    Method = METHODS[args.method]
    ddp, rank, world_size, device = distributed.setup(args.device, args.batch_size)
    if ddp and not Method.distributed:
        raise ValueError(f"--method {args.method} does not run under torchrun (yet): run it as one process")
    main_process = rank == 0  # logs, shows the bar and writes every file
    pipe = load_pipeline(args.model, device=device, unet=args.unet, prediction_type=args.prediction_type)
    device, cuda = pipe.device, pipe.device.type == "cuda"
    compute_dtype = cli.autocast_dtype(args.dtype, device)
    dataset = None
    if not Method.data_free:
        if args.data is None:
            from mini_safediff.miniature.digits import BUILTIN_DATA, builtin_dataset
            args.data = str(builtin_dataset(Path(args.out) / BUILTIN_DATA))
        dataset = SafetyDataset(args.data, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                                random_flip=args.random_flip, skip_bad=args.skip_bad)

    def autocast():
        return torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    unet = pipe.unet.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(args.seed)  # VAE posterior samples, noise, timesteps
    method = Method(args, pipe, dataset, generator, ddp=ddp, rank=rank, world_size=world_size, autocast=autocast)
    trained = method.parameters()
    unet.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    optimizer = adamw(trained, args.lr, args.weight_decay, bf16_state=args.adam_bf16)
    ema = EMA(unet, args.ema) if args.ema else None
    step, restored = start_or_resume(out, args.resume, unet, optimizer, generator, main_process,
                                     settings=vars(args), allow_changed=args.allow_changed_settings,
                                     flags=cli.flag_names(make_parser(["--preset", args.preset])))
    if restored:
        method.load_state_dict(restored["method"])
    if restored and ema:
        ema.load_state_dict(restored["ema"])
    net = DDP(unet, device_ids=[device] if cuda else None) if ddp else unet  # DDP averages the gradients

    def checkpoint(at_step, rng, method_state):
        """The state at the start of step `at_step`: the weights and optimizer now, the generator and the
        method's state as they were before that step drew from them."""
        if main_process:
            save_checkpoint({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                             "method": method_state, "generator": rng, "ema": ema.state_dict() if ema else None,
                             "step": at_step, "args": vars(args)}, checkpoint_path)
        return at_step

    def boundary():  # everything a checkpoint of the current step boundary holds besides weights and optimizer
        return generator.get_state(), method.state_dict()

    if main_process:
        if args.preset in FOR_STABLE_DIFFUSION and Path(args.model).resolve() == BUILTIN_MODEL:
            print(f"note: --preset {args.preset} holds the paper's settings, made for Stable Diffusion: on the tiny "
                  "built-in model they change nothing visible (its harmful rate stays about 1.0); --preset "
                  "miniature uses the miniature's calibrated settings")
        print(f"training {sum(p.numel() for p in trained) / 1e6:.1f}M UNet parameters {method.describe()} with "
              f"{args.method.upper()}, {args.steps} steps, device {device}" + (f", {world_size} processes" if ddp else ""))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not main_process, desc=f"train {args.method}")
    started = time.time()
    saved_step = step if restored else None  # the step of the last checkpoint that holds a good state
    due = False  # a checkpoint falls due at this boundary; written once this step's weights prove finite
    with StopRequest() as stop:
        while step < args.steps:
            rng, method_state = boundary()
            lr = lr_at(step, args.lr, args.steps, args.lr_schedule, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_stats = []
            for micro in range(args.grad_accum):
                batch = method.batch(step * args.grad_accum + micro)
                if ddp:  # gradients are averaged over the ranks on the last micro-batch's backward only
                    net.require_backward_grad_sync = micro == args.grad_accum - 1
                with autocast():
                    pred = net(batch.x_t, batch.t, batch.context, **batch.added)
                loss, stats = method.loss(pred, batch)
                (loss / args.grad_accum).backward()
                micro_stats.append(stats)
            stats = step_means(micro_stats, ddp, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm).item()
            problem = divergence(stats["loss"], grad_norm)  # the same on every rank: all stop before the update
            if problem:
                sys.exit(f"step {step}: {problem} ({stats}). Stopped before the update; "
                         f"{last_good(checkpoint_path, saved_step)}. Try a smaller --lr"
                         f"{' or --lambda' if getattr(args, 'lam', None) else ''}.")
            if due:  # this step's weights gave a finite loss and gradient: keep them
                saved_step, due = checkpoint(step, rng, method_state), False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema.update(unet)
            step += 1
            if main_process:
                write_log(log_path, [{"step": step, "lr": lr, **stats, "grad_norm": grad_norm,
                                      "seconds": round(time.time() - started, 3)}], append=True)
            bar.update(1)
            bar.set_postfix({key: f"{value:.4g}" for key, value in stats.items() if key != "centre_distance"})
            due = due or step % args.checkpoint_every == 0
            if stop.agreed(ddp, device) and step < args.steps:
                if not all_finite(unet.parameters()):
                    sys.exit(f"\nstopped at step {step}: the weights are not finite, not saved; "
                             f"{last_good(checkpoint_path, saved_step)}")
                checkpoint(step, *boundary())
                sys.exit(f"\nstopped at step {step}: saved {checkpoint_path}; continue with --resume")
    bar.close()
    if not all_finite(unet.parameters()):
        sys.exit(f"step {step}: the weights are not finite; nothing saved. {last_good(checkpoint_path, saved_step)}")
    checkpoint(step, *boundary())

    if ema:
        unet.load_state_dict(ema.shadow)
    unet.eval().requires_grad_(False)
    if main_process:
        pipe.save(out / "model")
        pipe.save(out / "model.safetensors")
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        print(f"saved {out / 'model'} (diffusers layout) and {out / 'model.safetensors'}")
    if ddp:
        torch.distributed.barrier()  # the other ranks return once the model is written
    return out / "model"


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_args(args)  # before --out is claimed: a refused run leaves nothing behind
    try:
        with owned_folder(args.out, "train.py", enabled=distributed.is_main_process()):
            return train(args)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, a missing file, a full or read-only disk: one line
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop (the first one in it stops at the step's end)
        sys.exit("\ntrain.py: interrupted; the same command with --resume continues from the last checkpoint")
