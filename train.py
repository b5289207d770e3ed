"""Safety training by contrastive forgetting (Pan et al., NeurIPS 2024): fine-tune the UNet so that clean
and harmful data sit far apart in its latent predictions (LT: latent transformation, NG: noise guidance).

    python train.py                                   # built-in tiny model and digits data, LT
    python train.py --model sd-v1-4/ --data my_data/ --method ng --lambda 5e-3 --out runs/ng
    python train.py --model sd-v1-4/ --unet esd-unet.safetensors ...   # safety reinforcement

--data is a folder with metadata.jsonl rows {"file_name", "text", "class": 1 clean | 2 harmful}.
--no-contrast-grad reproduces the official code, whose contrastive term carries no gradient (.item()).

    torchrun --nproc_per_node 4 train.py --batch-size 8 ...   # DDP: the global batch of 8 split 2 a GPU

Under torchrun (DistributedDataParallel; nccl on CUDA, gloo on the CPU) the same global batch trains the same
weights as one process: every rank draws the whole batch's random numbers and keeps its rows, and the class
centres are summed over the ranks. Rank 0 alone logs and writes; --resume works with any number of processes.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mini_safediff import distributed
from mini_safediff.methods.contrastive import ContrastiveCentres, SafetyLossConfig, ng_noise, safety_loss
from mini_safediff.models.pipeline import BUILTIN_MODEL, load_pipeline
from mini_safediff.training.checkpoints import save_checkpoint, start_or_resume, write_log
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.optim import EMA, adamw, lr_at
from mini_safediff.training.steps import draw_noise_and_timesteps, encode_batch, step_means


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BUILTIN_MODEL), help="diffusers folder or single file (default: built-in)")
    p.add_argument("--unet", help="UNet weights loaded over --model: safety reinforcement of an already-safe UNet")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override (single files)")
    p.add_argument("--data", help="metadata.jsonl folder (default: the built-in digits data)")
    p.add_argument("--method", choices=["lt", "ng"], default="lt")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="the global batch (under torchrun: all processes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lambda", dest="lam", type=float, default=5e-5, help="weight of the contrastive term")
    p.add_argument("--lambda-contrast", type=float, default=1.0, help="lambda_c: weight of d_other inside it")
    p.add_argument("--margin", type=float, default=0.0, help="l")
    p.add_argument("--contrast", choices=["official", "hinge"], default="official")
    p.add_argument("--harmful-weight", type=float, default=0.0, help="MSE weight of harmful rows (-0.5: high safety)")
    p.add_argument("--no-contrast-grad", action="store_true", help="official code: contrastive term without gradient")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--adam-bf16", action="store_true", help="AdamW with its moments in bfloat16 (half the state)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--balanced", action="store_true", help="alternate clean and harmful rows")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--skip-bad", action="store_true", help="skip bad data rows (with a count) instead of stopping")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on CUDA)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="(default: on CUDA)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train(args) -> Path:
    out = Path(args.out)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    ddp, rank, world_size, device = distributed.setup(args.device, args.batch_size)
    main_process = rank == 0  # logs, shows the bar and writes every file
    pipe = load_pipeline(args.model, device=device, unet=args.unet, prediction_type=args.prediction_type)
    device, cuda = pipe.device, pipe.device.type == "cuda"
    bf16 = cuda if args.bf16 is None else args.bf16
    if args.data is None:
        from mini_safediff.miniature.digits import builtin_dataset
        args.data = str(builtin_dataset())
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = SafetyDataset(args.data, resolution, random_flip=args.random_flip, skip_bad=args.skip_bad)
    loss_config = SafetyLossConfig(method=args.method, lam=args.lam, lam_contrast=args.lambda_contrast,
                                   margin=args.margin, contrast=args.contrast, harmful_weight=args.harmful_weight,
                                   contrast_grad=not args.no_contrast_grad)

    # Only the UNet trains; the VAE and the text encoder stay frozen in eval mode.
    unet = pipe.unet.train().requires_grad_(True)
    unet.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    optimizer = adamw(unet.parameters(), args.lr, args.weight_decay, bf16_state=args.adam_bf16)
    generator = torch.Generator().manual_seed(args.seed)  # VAE posterior samples, noise, timesteps
    latent_shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    centres = ContrastiveCentres(latent_shape, generator, sum_over_ranks=ddp)
    ema = EMA(unet, args.ema) if args.ema else None
    step, restored = start_or_resume(out, args.resume, unet, optimizer, generator, main_process)
    if restored:
        centres.load_state_dict(restored["centres"])
        if ema:
            ema.load_state_dict(restored["ema"])
    net = DDP(unet, device_ids=[device] if cuda else None) if ddp else unet  # DDP averages the gradients

    def checkpoint():
        if main_process:
            save_checkpoint({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                             "centres": centres.state_dict(), "generator": generator.get_state(),
                             "ema": ema.state_dict() if ema else None, "step": step, "args": vars(args)},
                            checkpoint_path)

    if main_process:
        print(f"training {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M UNet parameters on {len(dataset)} "
              f"rows ({int(dataset.harmful.sum())} harmful) with {args.method.upper()}, {args.steps} steps, "
              f"device {device}" + (f", {world_size} processes" if ddp else ""))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not main_process, desc=f"train {args.method}")
    started = time.time()
    try:
        while step < args.steps:
            lr = lr_at(step, args.lr, args.steps, args.lr_schedule, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_stats = []
            for micro in range(args.grad_accum):
                batch = load_batch(dataset, args.batch_size, step * args.grad_accum + micro, args.seed, args.balanced,
                                   rank, world_size)
                x0, context, added = encode_batch(pipe, batch, generator, rank, world_size)
                noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, generator, rank,
                                                    world_size)
                harmful = batch["harmful"].to(device)
                x_t = pipe.schedule.add_noise(x0, ng_noise(noise, harmful) if args.method == "ng" else noise, t)
                if ddp:  # gradients are averaged over the ranks on the last micro-batch's backward only
                    net.require_backward_grad_sync = micro == args.grad_accum - 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred = net(x_t, t, context, **added)
                loss, stats = safety_loss(pred, x_t, t, x0, noise, harmful, pipe.schedule, centres, loss_config)
                (loss / args.grad_accum).backward()
                micro_stats.append(stats)
            stats = step_means(micro_stats, ddp, device)
            if not math.isfinite(stats["loss"]):  # the same on every rank: all stop before the step
                sys.exit(f"step {step}: the loss is {stats['loss']} ({stats}). Stopped; the last good "
                         f"checkpoint is {checkpoint_path}. Try a smaller --lr or --lambda.")
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema.update(unet)
            step += 1
            if main_process:
                write_log(log_path, [{"step": step, "lr": lr, **stats, "grad_norm": grad_norm,
                                      "seconds": round(time.time() - started, 3)}], append=True)
            bar.update(1)
            bar.set_postfix(mse=f"{stats['mse']:.4f}", con=f"{stats['contrastive']:.1f}",
                            d_own=f"{stats['d_own']:.1f}", d_other=f"{stats['d_other']:.1f}")
            if step % args.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        sys.exit(f"\ninterrupted at step {step}: saved {checkpoint_path}; continue with --resume")
    bar.close()
    checkpoint()

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
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
    finally:
        distributed.cleanup()
