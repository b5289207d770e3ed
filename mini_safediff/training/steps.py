"""What one training step of train.py and attack.py draws and computes besides the model call: the batch's
latents and text, its noise and timesteps, the mean squared error and the plain diffusion loss, the logged means."""
import torch

from ..distributed import mean_over_ranks, shard


@torch.no_grad()
def encode_batch(pipe, batch: dict, generator: torch.Generator, rank: int = 0, world_size: int = 1):
    """Images -> scaled latents x0 (sampled from the VAE posterior); texts -> what the UNet takes besides the
    noisy latents and timesteps, as `unet(x_t, t, context, **added)`: the context (CLIP hidden states) and, for
    SDXL, `added` = the pooled text and the time ids of the training images ({} for SD 1 / 2). Returns
    (x0, context, added). Under DDP `batch` holds this rank's rows; the posterior noise is drawn for the whole
    batch and sliced."""
    pixels = batch["pixel_values"].to(pipe.device, pipe.dtype)
    posterior = pipe.vae.encode(pixels)
    # What posterior.sample(generator) draws, for world_size times as many rows: every rank takes its own.
    eps = torch.randn((world_size * len(pixels), *posterior.mean.shape[1:]), generator=generator,
                      device=generator.device, dtype=posterior.mean.dtype)
    sample = posterior.mean + posterior.std * shard(eps, rank, world_size).to(pipe.device)
    # SDXL's time ids as at sampling: original and target size the training resolution, crop corner (0, 0).
    context, added = pipe.conditioning(batch["text"], *pixels.shape[-2:])
    return (sample * pipe.vae.config.scaling_factor).float(), context, added


def draw_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator,
                             rank: int = 0, world_size: int = 1):
    """Drawn on the CPU from the run's own generator: the same numbers on every device and after resume.
    Under DDP `latents` are this rank's rows: the whole batch is drawn and this rank's rows kept."""
    shape = (world_size * latents.shape[0], *latents.shape[1:])
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, shape[:1], generator=generator)
    return shard(noise, rank, world_size).to(latents.device), shard(timesteps, rank, world_size).to(latents.device)


def step_means(micro_stats: list, ddp: bool, device) -> dict:
    """A step's numbers for the log: each averaged over the step's micro-batches and, under DDP, over the
    processes (one all-reduce a step)."""
    means = {key: sum(stats[key] for stats in micro_stats) / len(micro_stats) for key in micro_stats[0]}
    return mean_over_ranks(means, device) if ddp else means


def mse(pred: torch.Tensor, target: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """The mean squared error in float32 (also under bf16 autocast): of the whole batch, or (B,) of each row."""
    squared = (pred.float() - target).pow(2)
    return squared.flatten(1).mean(1) if per_row else squared.mean()


def diffusion_loss(pred, x0, noise, t, schedule) -> torch.Tensor:
    """The plain denoising loss that SD is trained (and attacked) with: MSE to the eps or v target."""
    return mse(pred, schedule.target(x0, noise, t))
