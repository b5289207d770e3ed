"""Malicious fine-tuning: what someone does with released weights to bring a harmful concept back.
Plain diffusion loss (eps or v, as the model's scheduler says) on harmful images, full UNet or LoRA.

    python attack.py                                            # the built-in base model and data, 20 steps
    python attack.py --preset miniature --model runs/train/model  # the miniature's attack on train.py's model
    python attack.py --model base=sd-v1-4/ --model runs/lt/model --data my_data/ --save-at 0,20
    python attack.py --model sd-v1-4/ --harmful-only-data nsfw_images/ --lora-rank 8 --lr 1e-4

Every model is attacked identically: same seed, same data order, same noise. Outputs per model under
--out/NAME/: step-K/model (diffusers folder) and step-K/model.safetensors for each snapshot K,
log.jsonl, attack.json (every hyperparameter and the data files used), lora.safetensors with LoRA.

    torchrun --nproc_per_node 4 attack.py --batch-size 8 ...  # DDP: the same weights as one process, faster
"""
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mini_safediff import cli, distributed
from mini_safediff.io import write_json
from mini_safediff.miniature.settings import MINIATURE_ATTACK
from mini_safediff.models.loading import load_pipeline
from mini_safediff.models.pipeline import BUILTIN_MODEL
from mini_safediff.models.weights import save_state_dict
from mini_safediff.training.checkpoints import save_checkpoint, start_or_resume, write_log
from mini_safediff.training.data import SafetyDataset, load_batch
from mini_safediff.training.guard import StopRequest, all_finite, divergence, last_good
from mini_safediff.training.lora import add_lora, lora_state_dict, merged_state_dict
from mini_safediff.training.optim import adamw
from mini_safediff.training.steps import diffusion_loss, draw_noise_and_timesteps, encode_batch, step_means

# The paper's attack on Stable Diffusion, and the miniature's calibrated one.
PRESETS = {"paper": {"lr": 1e-5, "batch_size": 1, "steps": 20}, "miniature": MINIATURE_ATTACK}


def make_parser(argv=None):
    """The parser, its defaults those of the --preset that argv names."""
    p = cli.make_parser(__doc__)
    cli.add_model_options(p, several=True, training=True, model_default_help="base=the built-in base model")
    p.add_argument("--data", help="metadata.jsonl folder; its class-2 rows are used (default: the built-in digits "
                                  "data, unless --harmful-only-data is given)")
    p.add_argument("--harmful-only-data",
                   help="folder whose rows are all used as harmful, class optional (default: none, use --data)")
    p.add_argument("--steps", type=cli.positive_int, help="optimizer steps")
    p.add_argument("--lr", type=cli.positive_float, help="AdamW learning rate")
    p.add_argument("--batch-size", type=cli.positive_int, help="the global batch (under torchrun: all processes)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lora-rank", type=cli.natural_int, default=0, help="LoRA on the attention projections; 0: the full UNet")
    p.add_argument("--lora-alpha", type=cli.positive_float, help="LoRA scale is alpha / rank (default: alpha = rank)")
    p.add_argument("--save-at", default="",
                   help="more snapshot steps, e.g. 0,20,100 (default: none; the last step is always saved)")
    cli.add_training_options(p)
    p.add_argument("--seed", type=int, default=0, help="data order, noise and timesteps: the same for every model")
    p.add_argument("--out", default="runs/attack", help="folder with a subfolder per model, --out/NAME")
    cli.add_resume_options(p, "each model's --out/NAME/checkpoint.pt")
    cli.add_quiet(p)
    cli.apply_preset(p, PRESETS, argv, default="paper")
    return p


def parse_args(argv=None):
    return make_parser(argv).parse_args(argv)


def attack(args) -> list:
    save_at = sorted({int(s) for s in args.save_at.split(",") if s.strip()} | {args.steps})
    if save_at[0] < 0 or save_at[-1] > args.steps:
        sys.exit(f"--save-at {args.save_at}: snapshots must lie between 0 and --steps {args.steps}")
    if args.model is None:
        print("attacking the built-in base model; pass --model runs/train/model to attack what train.py just made")
        args.model = [f"base={BUILTIN_MODEL}"]
    models = cli.model_pairs(args.model)
    if args.data is None and args.harmful_only_data is None:
        from mini_safediff.miniature.digits import builtin_dataset
        args.data = str(builtin_dataset())
    return [attack_one(path, Path(args.out) / name, save_at, args) for name, path in models]


def attack_one(model: str, out: Path, save_at: list, args) -> Path:
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    ddp, rank, world_size, device = distributed.setup(args.device, args.batch_size)
    main_process = rank == 0  # logs, shows the bar and writes every file
    pipe = load_pipeline(model, device=device, unet=args.unet, prediction_type=args.prediction_type)
    device, cuda = pipe.device, pipe.device.type == "cuda"
    compute_dtype = cli.autocast_dtype(args.dtype, device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = SafetyDataset(args.harmful_only_data or args.data, resolution, random_flip=args.random_flip,
                            skip_bad=args.skip_bad, rows="all_harmful" if args.harmful_only_data else "harmful")

    unet = pipe.unet.train()
    unet.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    params = add_lora(unet, args.lora_rank, args.lora_alpha, args.seed) if args.lora_rank else list(
        unet.requires_grad_(True).parameters())
    optimizer = adamw(params, args.lr, args.weight_decay, bf16_state=args.adam_bf16)
    generator = torch.Generator().manual_seed(args.seed)  # the same stream for every attacked model
    step, restored = start_or_resume(out, args.resume, unet, optimizer, generator, main_process,
                                     settings=vars(args), allow_changed=args.allow_changed_settings)
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

    def checkpoint(at_step, rng):
        """The state at the start of step `at_step`: weights and optimizer now, the generator as it was then."""
        if main_process:
            save_checkpoint({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "generator": rng,
                             "step": at_step, "args": vars(args)}, checkpoint_path)
        return at_step

    if main_process:
        print(f"attacking {model} on {len(dataset)} harmful rows, {args.steps} steps, "
              f"{'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full UNet'}, device {device}"
              + (f", {world_size} processes" if ddp else ""))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not main_process, desc=f"attack {out.name}")
    started = time.time()
    saved_step = step if restored else None  # the step of the last checkpoint that holds a good state
    due = False  # a checkpoint falls due at this boundary; written once this step's weights prove finite
    with StopRequest() as stop:
        while True:
            if step in save_at and main_process:  # rewritten, not skipped: an earlier run may have left other weights
                if not all_finite(params):
                    sys.exit(f"{out.name} step {step}: the weights are not finite; snapshot not saved. "
                             f"{last_good(checkpoint_path, saved_step)}")
                save_snapshot(pipe, out / f"step-{step}", args.lora_rank)
            if step == args.steps:
                break
            rng = generator.get_state()
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
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    pred = net(x_t, t, context, **added)
                loss = diffusion_loss(pred, x0, noise, t, pipe.schedule)
                (loss / args.grad_accum).backward()
                micro_stats.append({"loss": loss.item()})
            stats = step_means(micro_stats, ddp, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            problem = divergence(stats["loss"], grad_norm)  # the same on every rank: all stop before the update
            if problem:
                sys.exit(f"{out.name} step {step}: {problem}. Stopped before the update; "
                         f"{last_good(checkpoint_path, saved_step)}. Try a smaller --lr.")
            if due:  # this step's weights gave a finite loss and gradient: keep them
                saved_step, due = checkpoint(step, rng), False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if main_process:
                write_log(log_path, [{"step": step, "lr": args.lr, "loss": stats["loss"], "grad_norm": grad_norm,
                                      "files": batch["file_name"], "seconds": round(time.time() - started, 3)}],
                          append=True)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            due = due or step % args.checkpoint_every == 0
            if stop.agreed(ddp, device) and step < args.steps:
                if not all_finite(params):
                    sys.exit(f"\nstopped at step {step}: the weights are not finite, not saved; "
                             f"{last_good(checkpoint_path, saved_step)}")
                checkpoint(step, generator.get_state())
                sys.exit(f"\nstopped at step {step}: saved {checkpoint_path}; continue with --resume")
    bar.close()
    checkpoint(step, generator.get_state())
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
    except (ValueError, OSError) as e:  # bad input, a missing file, a full or read-only disk: one line
        sys.exit(f"attack.py: {e}")
    finally:
        distributed.cleanup()
