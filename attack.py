"""Malicious fine-tuning: what someone does with released weights to bring a harmful concept back.
Plain diffusion loss (eps or v, as the model's scheduler says) on harmful images, full UNet or LoRA.

    python attack.py                                            # built-in models and data, 20 steps
    python attack.py --model runs/base runs/lt/model --data my_data/ --steps 200 --save-at 0,20,100,200
    python attack.py --model sd-v1-4/ --harmful-only-data nsfw_images/ --lora-rank 8 --lr 1e-4

Every model is attacked identically: same seed, same data order, same noise. Outputs per model under
--out/NAME/: step-K/model (diffusers folder) and step-K/model.safetensors for each snapshot K,
log.jsonl, attack.json (every hyperparameter and the data files used), lora.safetensors with LoRA.

    torchrun --nproc_per_node 4 attack.py --batch-size 8 ...  # DDP: the same weights as one process, faster
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mini_safediff import distributed
from mini_safediff.models.pipeline import BUILTIN_MODEL, load_pipeline
from mini_safediff.models.weights import save_state_dict, write_json
from mini_safediff.training.checkpoints import save_checkpoint, start_or_resume, write_log
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.lora import add_lora, lora_state_dict, merged_state_dict
from mini_safediff.training.optim import adamw
from mini_safediff.training.steps import diffusion_loss, draw_noise_and_timesteps, encode_batch, step_means


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[str(BUILTIN_MODEL)], metavar="[NAME=]PATH",
                   help="one or more models to attack")
    p.add_argument("--unet", help="UNet weights loaded over every --model")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override (single files)")
    p.add_argument("--data", help="metadata.jsonl folder; its class-2 rows are used (default: built-in digits)")
    p.add_argument("--harmful-only-data", help="folder whose rows are all used as harmful (class optional)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=1, help="the global batch (under torchrun: all processes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=0, help="0: full UNet fine-tuning")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale is alpha / rank (default alpha = rank)")
    p.add_argument("--save-at", default="", help="snapshot steps, e.g. 0,20,100,200 (the last step is always saved)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--adam-bf16", action="store_true", help="AdamW with its moments in bfloat16 (half the state)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on CUDA)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="(default: on CUDA)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--out", default="runs/attack")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def named_models(models: list) -> list:
    """(name, path) pairs for the output folders: `NAME=PATH`, or the model's own name (`runs/lt/model` -> `lt`),
    numbered when names clash."""
    pairs = [m.split("=", 1) if "=" in m else
             (Path(m).stem if Path(m).stem != "model" else Path(m).parent.name, m) for m in models]
    names = [name for name, _ in pairs]
    return [(f"{name}-{i}" if names.count(name) > 1 else name, path) for i, (name, path) in enumerate(pairs)]


def attack(args) -> list:
    save_at = sorted({int(s) for s in args.save_at.split(",") if s.strip()} | {args.steps})
    if save_at[0] < 0 or save_at[-1] > args.steps:
        sys.exit(f"--save-at {args.save_at}: snapshots must lie between 0 and --steps {args.steps}")
    if args.data is None and args.harmful_only_data is None:
        from mini_safediff.miniature.digits import builtin_dataset
        args.data = str(builtin_dataset())
    return [attack_one(path, Path(args.out) / name, save_at, args) for name, path in named_models(args.model)]


def attack_one(model: str, out: Path, save_at: list, args) -> Path:
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    ddp, rank, world_size, device = distributed.setup(args.device, args.batch_size)
    main_process = rank == 0  # logs, shows the bar and writes every file
    pipe = load_pipeline(model, device=device, unet=args.unet, prediction_type=args.prediction_type)
    device, cuda = pipe.device, pipe.device.type == "cuda"
    bf16 = cuda if args.bf16 is None else args.bf16
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = SafetyDataset(args.harmful_only_data or args.data, resolution, random_flip=args.random_flip,
                            skip_bad=args.skip_bad, rows="all_harmful" if args.harmful_only_data else "harmful")

    unet = pipe.unet.train()
    unet.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    params = add_lora(unet, args.lora_rank, args.lora_alpha, args.seed) if args.lora_rank else list(
        unet.requires_grad_(True).parameters())
    optimizer = adamw(params, args.lr, args.weight_decay, bf16_state=args.adam_bf16)
    generator = torch.Generator().manual_seed(args.seed)  # the same stream for every attacked model
    step, _ = start_or_resume(out, args.resume, unet, optimizer, generator, main_process)
    net = DDP(unet, device_ids=[device] if cuda else None) if ddp else unet  # DDP averages the gradients
    if main_process:
        write_json(out / "attack.json", {
            "model": model, "unet": args.unet, "mode": f"lora-r{args.lora_rank}" if args.lora_rank else "full",
            "data": str(Path(dataset.folder).resolve()), "files": [row["file_name"] for row in dataset.rows],
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("model", "out", "resume", "quiet")},
            "save_at": save_at})
        stale = sorted({p.name for p in out.glob("step-*")} - {f"step-{k}" for k in save_at})
        if stale:  # left in place (they may be wanted), but attack.json no longer describes them
            print(f"warning: {out} also holds {', '.join(stale)} from an earlier run, not from this one",
                  file=sys.stderr)

    def checkpoint():
        if main_process:
            save_checkpoint({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                             "generator": generator.get_state(), "step": step, "args": vars(args)}, checkpoint_path)

    if main_process:
        print(f"attacking {model} on {len(dataset)} harmful rows, {args.steps} steps, "
              f"{'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full UNet'}, device {device}"
              + (f", {world_size} processes" if ddp else ""))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not main_process, desc=f"attack {out.name}")
    started = time.time()
    try:
        while True:
            if step in save_at and main_process:  # rewritten, not skipped: an earlier run may have left other weights
                save_snapshot(pipe, out / f"step-{step}", args.lora_rank)
            if step == args.steps:
                break
            micro_stats = []
            for micro in range(args.grad_accum):
                batch = load_batch(dataset, args.batch_size, step * args.grad_accum + micro, args.seed,
                                   rank=rank, world_size=world_size)
                x0, context, added = encode_batch(pipe, batch, generator, rank, world_size)
                noise, t = draw_noise_and_timesteps(x0, pipe.schedule.config.num_train_timesteps, generator, rank,
                                                    world_size)
                x_t = pipe.schedule.add_noise(x0, noise, t)
                if ddp:  # gradients are averaged over the ranks on the last micro-batch's backward only
                    net.require_backward_grad_sync = micro == args.grad_accum - 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred = net(x_t, t, context, **added)
                loss = diffusion_loss(pred, x0, noise, t, pipe.schedule)
                (loss / args.grad_accum).backward()
                micro_stats.append({"loss": loss.item()})
            stats = step_means(micro_stats, ddp, device)
            if not math.isfinite(stats["loss"]):  # the same on every rank: all stop before the step
                sys.exit(f"{out.name} step {step}: the loss is {stats['loss']}. Stopped; the last good "
                         f"checkpoint is {checkpoint_path}. Try a smaller --lr.")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if main_process:
                write_log(log_path, [{"step": step, "lr": args.lr, "loss": stats["loss"], "grad_norm": grad_norm,
                                      "files": batch["file_name"], "seconds": round(time.time() - started, 3)}],
                          append=True)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if step % args.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        sys.exit(f"\ninterrupted at step {step}: saved {checkpoint_path}; continue with --resume")
    bar.close()
    checkpoint()
    if main_process:
        if args.lora_rank:
            save_state_dict(lora_state_dict(unet), out / "lora.safetensors")
        print(f"saved snapshots {save_at} under {out}")
    if ddp:
        torch.distributed.barrier()  # the other ranks return once the snapshots are written
    return out / f"step-{args.steps}" / "model"


def save_snapshot(pipe, folder: Path, lora_rank: int):
    """The attacked model as it is now, LoRA merged into a copy (training goes on with the LoRA layers)."""
    unet = pipe.unet
    if lora_rank:
        with torch.device("meta"):
            pipe.unet = type(unet)(unet.config)
        pipe.unet.load_state_dict(merged_state_dict(unet), assign=True)
    pipe.save(folder / "model")
    pipe.save(folder / "model.safetensors")
    pipe.unet = unet


if __name__ == "__main__":
    try:
        attack(parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"attack.py: {e}")
    finally:
        distributed.cleanup()
