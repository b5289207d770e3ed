"""Safety training by contrastive forgetting (Pan et al., NeurIPS 2024): fine-tune the UNet so that clean
and harmful data sit far apart in its latent predictions (LT: latent transformation, NG: noise guidance).

    python train.py                                   # built-in tiny model and digits data, the paper's LT
    python train.py --preset miniature                # the same with the miniature's calibrated settings
    python train.py --model sd-v1-4/ --data my_data/ --method ng --lambda 5e-3 --out runs/ng
    python train.py --model sd-v1-4/ --unet esd-unet.safetensors ...   # safety reinforcement

--data is a folder with metadata.jsonl rows {"file_name", "text", "class": 1 clean | 2 harmful}.
--no-contrast-grad reproduces the official code, whose contrastive term carries no gradient (.item()).

The ESD baseline (Gandikota et al. 2023; mini_safediff/methods/esd.py) erases a concept given as text, data-free:

    python train.py --method esd-u --concept "a handwritten digit seven" --out runs/esd   # --preset esd

Immunization by simulated attacks (beyond the paper; mini_safediff/methods/immunize.py, docs/immunize.md): the
clean loss, ascent on harmful rows, and the harmful loss after K simulated fine-tuning steps made high:

    python train.py --method immunize --out runs/immunize      # --preset immunize; not under torchrun

    torchrun --nproc_per_node 4 train.py --batch-size 8 ...   # DDP: the global batch of 8 split 2 a GPU

Under torchrun (DistributedDataParallel; nccl on CUDA, gloo on the CPU) the same global batch trains the same
weights as one process: every rank draws the whole batch's random numbers and keeps its rows, and the class
centres are summed over the ranks. Rank 0 alone logs and writes; --resume works with any number of processes.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mini_safediff import cli, distributed
from mini_safediff.methods.contrastive import ContrastiveCentres, SafetyLossConfig, ng_noise, safety_loss
from mini_safediff.methods.esd import ESD_METHODS, esd_batch, esd_loss, select_parameters
from mini_safediff.methods.immunize import (INNER_GRADS, INNER_OPTIMIZERS, ImmunizeConfig, draw_attack,
                                            immunize_loss, inner_batches)
from mini_safediff.miniature.settings import MINIATURE_TRAIN
from mini_safediff.models.loading import load_pipeline
from mini_safediff.models.pipeline import BUILTIN_MODEL
from mini_safediff.training.checkpoints import save_checkpoint, start_or_resume, write_log
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.guard import StopRequest, all_finite, divergence, last_good
from mini_safediff.training.optim import EMA, adamw, lr_at
from mini_safediff.training.steps import draw_noise_and_timesteps, encode_batch, step_means

# The paper's settings for Stable Diffusion (the official code's defaults), and the miniature's calibrated ones.
PRESETS = {"paper": {"steps": 200, "lr": 1e-5, "batch_size": 1, "balanced": False, "method": "lt", "lam": 5e-5,
                     "harmful_weight": 0.0},
           "miniature": MINIATURE_TRAIN,
           # ESD's paper and script: 1000 iterations of Adam (AdamW without decay), lr 1e-5, batch 1, eta 1.
           "esd": {"steps": 1000, "lr": 1e-5, "batch_size": 1, "method": "esd-u", "weight_decay": 0.0},
           # Immunization: the miniature's settings of its naive row (ascent -0.5, no contrastive term), the row it is
           # to be compared with, plus the simulated attack (its own options' defaults).
           "immunize": {**MINIATURE_TRAIN, "method": "immunize", "lam": 0.0}}


def make_parser(argv=None):
    """The parser, its defaults those of the --preset that argv names."""
    p = cli.make_parser(__doc__)
    cli.add_model_options(p, training=True)
    p.add_argument("--data", help="metadata.jsonl folder (default: the built-in digits data)")
    p.add_argument("--method", choices=["lt", "ng", *ESD_METHODS, "immunize"],
                   help="lt: latent transformation, ng: noise guidance; the ESD baseline, data-free: esd-u trains "
                        "every UNet weight except cross-attention (attn2), the time embedding and the output layers "
                        "(ESD's noxattn), esd-x only every cross-attention (attn2) weight (ESD's xattn); with these "
                        "--preset defaults to esd; immunize: clean loss, ascent on harmful rows (--harmful-weight) and "
                        "the harmful loss after a simulated attack made high (not in the paper; --preset defaults to "
                        "immunize)")
    p.add_argument("--concept", action="append",
                   help="ESD: the concept to erase, as text; repeatable, each step draws one per row (default: "
                        "none; required with esd-u / esd-x)")
    p.add_argument("--negative-guidance", type=float, default=1.0,
                   help="ESD: eta, how far the target points away from the concept")
    p.add_argument("--steps", type=cli.positive_int, help="optimizer steps")
    p.add_argument("--lr", type=cli.positive_float, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="after the warmup")
    p.add_argument("--warmup", type=cli.natural_int, default=0, help="steps of linear learning-rate warmup")
    p.add_argument("--batch-size", type=cli.positive_int, help="the global batch (under torchrun: all processes)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lambda", dest="lam", type=float, metavar="LAMBDA",
                   help="lambda: the weight of the contrastive term")
    p.add_argument("--lambda-contrast", type=float, default=1.0,
                   help="lambda_c: the weight of d_other inside the contrastive term")
    p.add_argument("--margin", type=float, default=0.0, help="l: the margin of the hinge in the contrastive term")
    p.add_argument("--contrast", choices=["official", "hinge"], default="official",
                   help="the contrastive term: the official code's, or the paper's hinge with --margin")
    p.add_argument("--harmful-weight", type=float, help="MSE weight of harmful rows (-0.5: high safety)")
    p.add_argument("--no-contrast-grad", action="store_true", help="official code: contrastive term without gradient")
    p.add_argument("--attack-weight", type=float, default=1.0,
                   help="immunize: weight of the post-attack harmful MSE, subtracted from the loss")
    p.add_argument("--attack-cap", type=cli.positive_float, default=1.0,
                   help="immunize: the post-attack MSE counts up to this per row (1: a model that predicts 0)")
    p.add_argument("--inner-steps", type=cli.int_range, default="1,3",
                   help="immunize: simulated attack steps K, drawn uniformly from LOW,HIGH each step")
    p.add_argument("--inner-lr", type=cli.positive_float_range, default="3e-5,3e-4",
                   help="immunize: the simulated attack's learning rate, drawn log-uniformly from LOW,HIGH")
    p.add_argument("--inner-batch-size", type=cli.positive_int_range, default="1,8",
                   help="immunize: harmful rows per simulated attack step, drawn uniformly from LOW,HIGH")
    p.add_argument("--inner-optimizer", choices=INNER_OPTIMIZERS, default="adam",
                   help="immunize: the simulated attacker's optimizer (Adam from zero moments, no weight decay)")
    p.add_argument("--inner-grad", choices=INNER_GRADS, default="first-order",
                   help="immunize: the post-attack term's gradient at the attacked weights, applied to the real "
                        "ones, or exact (second order, through the inner steps; with the Adam attacker it does not agree "
                        "with first-order: docs/immunize.md)")
    p.add_argument("--immunize-with", choices=["lt", "ng"],
                   help="immunize: LT's or NG's loss (with --lambda and the contrastive options) in place of the "
                        "naive part, the post-attack term added (default: none, the naive ascent)")
    p.add_argument("--ema", type=cli.decay, default=0.0, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--balanced", action=argparse.BooleanOptionalAction,
                   help="alternate clean and harmful rows (or draw batches at random)")
    cli.add_training_options(p)
    p.add_argument("--seed", type=int, default=0, help="data order, VAE posterior samples, noise and timesteps")
    p.add_argument("--out", default="runs/train", help="folder for the model, checkpoint and log")
    cli.add_resume_options(p, "--out/checkpoint.pt")
    cli.add_quiet(p)
    # --method esd-u / esd-x without a --preset get ESD's settings, immunize its own, any other method the paper's
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method")
    chosen = method.parse_known_args(argv)[0].method
    cli.apply_preset(p, PRESETS, argv, default="esd" if chosen in ESD_METHODS else
                     "immunize" if chosen == "immunize" else "paper")
    return p


def parse_args(argv=None):
    return make_parser(argv).parse_args(argv)


def train(args) -> Path:
    out = Path(args.out)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    esd = args.method in ESD_METHODS
    if esd and not args.concept:
        raise ValueError(f"--method {args.method} erases a concept: give it with --concept TEXT")
    if esd and args.data:
        raise ValueError(f"--method {args.method} is data-free: it takes no --data")
    if not esd and args.concept:
        raise ValueError(f"--concept is ESD's (--method esd-u / esd-x), not {args.method}'s")
    immunize = args.method == "immunize"
    if immunize and args.lam and not args.immunize_with:
        raise ValueError(f"--lambda {args.lam}: --method immunize has no contrastive term (not combined with LT / "
                         f"NG unless --immunize-with lt|ng); use --lambda 0 or --preset immunize")
    ddp, rank, world_size, device = distributed.setup(args.device, args.batch_size)
    if immunize and ddp:  # the simulated attack would run per rank on its rows; DDP hooks would all-reduce it
        raise ValueError("--method immunize does not run under torchrun (yet): run it as one process")
    main_process = rank == 0  # logs, shows the bar and writes every file
    pipe = load_pipeline(args.model, device=device, unet=args.unet, prediction_type=args.prediction_type)
    device, cuda = pipe.device, pipe.device.type == "cuda"
    compute_dtype = cli.autocast_dtype(args.dtype, device)
    if args.data is None and not esd:
        from mini_safediff.miniature.digits import builtin_dataset
        args.data = str(builtin_dataset())
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if not esd:
        dataset = SafetyDataset(args.data, resolution, random_flip=args.random_flip, skip_bad=args.skip_bad)
    if immunize:
        if not dataset.harmful.any():
            raise ValueError(f"--method immunize simulates an attack on harmful rows: {args.data} has none (class 2)")
        immunize_config = ImmunizeConfig(
            harmful_weight=args.harmful_weight, attack_weight=args.attack_weight, cap=args.attack_cap,
            inner_steps=tuple(args.inner_steps), inner_lr=tuple(args.inner_lr),
            inner_batch=tuple(args.inner_batch_size), inner_optimizer=args.inner_optimizer, inner_grad=args.inner_grad)
    if not esd and (not immunize or args.immunize_with):
        loss_config = SafetyLossConfig(method=args.immunize_with if immunize else args.method, lam=args.lam,
                                       lam_contrast=args.lambda_contrast, margin=args.margin, contrast=args.contrast,
                                       harmful_weight=args.harmful_weight, contrast_grad=not args.no_contrast_grad)

    # Only the UNet trains (for ESD the part its method names); the VAE and the text encoder stay frozen.
    # ESD's targets come from a frozen copy of the starting UNet, rebuilt from --model / --unet on resume.
    frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False) if esd else None
    unet = pipe.unet.train().requires_grad_(True)
    trained = select_parameters(unet, args.method) if esd else list(unet.parameters())
    unet.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    optimizer = adamw(trained, args.lr, args.weight_decay, bf16_state=args.adam_bf16)
    generator = torch.Generator().manual_seed(args.seed)  # VAE posterior samples, noise, timesteps
    latent_shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    contrastive = not esd and (not immunize or args.immunize_with)
    centres = ContrastiveCentres(latent_shape, generator, sum_over_ranks=ddp) if contrastive else None
    ema = EMA(unet, args.ema) if args.ema else None
    step, restored = start_or_resume(out, args.resume, unet, optimizer, generator, main_process,
                                     settings=vars(args), allow_changed=args.allow_changed_settings)
    if restored and centres:
        centres.load_state_dict(restored["centres"])
    if restored and ema:
        ema.load_state_dict(restored["ema"])
    net = DDP(unet, device_ids=[device] if cuda else None) if ddp else unet  # DDP averages the gradients

    def checkpoint(at_step, rng, centre_state):
        """The state at the start of step `at_step`: the weights and optimizer now, the generator and centres as
        they were before that step drew from them."""
        if main_process:
            save_checkpoint({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                             "centres": centre_state, "generator": rng, "ema": ema.state_dict() if ema else None,
                             "step": at_step, "args": vars(args)}, checkpoint_path)
        return at_step

    def boundary():  # everything a checkpoint of the current step boundary holds besides weights and optimizer
        return generator.get_state(), centres and {key: value.clone() for key, value in centres.state_dict().items()}

    if main_process:
        if args.preset == "paper" and Path(args.model).resolve() == BUILTIN_MODEL:
            print("note: --preset paper holds the paper's settings, made for Stable Diffusion: on the tiny built-in "
                  "model they change nothing visible (its harmful rate stays about 1.0); --preset miniature uses "
                  "the miniature's calibrated settings")
        what = (f"erasing {' | '.join(args.concept)}" if esd else
                f"on {len(dataset)} rows ({int(dataset.harmful.sum())} harmful)")
        print(f"training {sum(p.numel() for p in trained) / 1e6:.1f}M UNet parameters {what} with "
              f"{args.method.upper()}, {args.steps} steps, device {device}" + (f", {world_size} processes" if ddp else ""))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not main_process, desc=f"train {args.method}")
    started = time.time()
    saved_step = step if restored else None  # the step of the last checkpoint that holds a good state
    due = False  # a checkpoint falls due at this boundary; written once this step's weights prove finite
    with StopRequest() as stop:
        while step < args.steps:
            rng, centre_state = boundary()
            lr = lr_at(step, args.lr, args.steps, args.lr_schedule, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_stats = []
            for micro in range(args.grad_accum):
                if esd:  # x_t sampled by the model being trained, the target from the frozen start
                    x_t, t, context, added, target = esd_batch(pipe, frozen, args.concept, args.batch_size,
                                                               args.negative_guidance, generator, rank, world_size)
                else:
                    batch = load_batch(dataset, args.batch_size, step * args.grad_accum + micro, args.seed,
                                       args.balanced, rank, world_size)
                    x0, context, added = encode_batch(pipe, batch, generator, rank, world_size)
                    noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, generator,
                                                        rank, world_size)
                    harmful = batch["harmful"].to(device)
                    ng = args.method == "ng" or (immunize and args.immunize_with == "ng")
                    x_t = pipe.schedule.add_noise(x0, ng_noise(noise, harmful) if ng else noise, t)
                if immunize:  # the attack is drawn after the batch, from the same generator
                    attack = draw_attack(immunize_config, generator)
                    inner = inner_batches(pipe, dataset, attack, generator) if harmful.any() else []
                if ddp:  # gradients are averaged over the ranks on the last micro-batch's backward only
                    net.require_backward_grad_sync = micro == args.grad_accum - 1
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    pred = net(x_t, t, context, **added)
                if esd:
                    loss, stats = esd_loss(pred, target)
                elif immunize:
                    base = (safety_loss(pred, x_t, t, x0, noise, harmful, pipe.schedule, centres, loss_config)
                            if args.immunize_with else None)  # LT / NG in place of the naive part
                    x_t_attack = pipe.schedule.add_noise(x0, noise, t) if ng else None  # the attacker's x_t
                    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                        loss, stats = immunize_loss(unet, pred, x_t, t, context, added, x0, noise, harmful,
                                                    pipe.schedule, attack, inner, immunize_config, base=base,
                                                    x_t_attack=x_t_attack)
                else:
                    loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, pipe.schedule, centres, loss_config)
                (loss / args.grad_accum).backward()
                micro_stats.append(stats)
            stats = step_means(micro_stats, ddp, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm).item()
            problem = divergence(stats["loss"], grad_norm)  # the same on every rank: all stop before the update
            if problem:
                sys.exit(f"step {step}: {problem} ({stats}). Stopped before the update; "
                         f"{last_good(checkpoint_path, saved_step)}. Try a smaller --lr"
                         f"{'' if esd or immunize else ' or --lambda'}.")
            if due:  # this step's weights gave a finite loss and gradient: keep them
                saved_step, due = checkpoint(step, rng, centre_state), False
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


if __name__ == "__main__":
    try:
        train(parse_args())
    except (ValueError, OSError) as e:  # bad input, a missing file, a full or read-only disk: one line
        sys.exit(f"train.py: {e}")
    finally:
        distributed.cleanup()
