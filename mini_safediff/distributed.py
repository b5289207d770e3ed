"""torchrun support for train.py and attack.py, nanoGPT-style: one call at the top of a script, `if ddp:` where a
step needs the other processes.

    torchrun --nproc_per_node 4 train.py --batch-size 8 ...     # DistributedDataParallel, 2 rows a process

--batch-size stays the global batch. Each process reads only its own rows, but draws the random numbers of the
whole batch (VAE posterior samples, noise, timesteps) from the run's seeded generator and keeps its rows: a row
gets the numbers it gets in one process, and the generator is in the same state on every rank, so the same global
batch trains the same weights, and checkpoints do not depend on the number of processes.
"""
import os

import torch
import torch.distributed as dist


def setup(device: str | None, batch_size: int | None = None) -> tuple[bool, int, int, str | None]:
    """(ddp, rank, world_size, device). Without torchrun (no RANK in the environment): (False, 0, 1, device).
    Under torchrun: joins the process group, nccl with the GPU of LOCAL_RANK when the device is CUDA (the
    default where there is one), gloo otherwise. Joins once: a caller such as evaluate.py may have done so.
    batch_size: a global training batch, refused unless it splits evenly over the processes."""
    if "RANK" not in os.environ:
        return False, 0, 1, device
    if batch_size is not None:
        _rows_per_rank(batch_size, int(os.environ["WORLD_SIZE"]))  # fail before any process waits for another
    cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU a process, whatever index --device named
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return True, dist.get_rank(), dist.get_world_size(), device or "cpu"


def is_main_process() -> bool:
    """Before setup too: rank 0 of a torchrun (RANK in the environment), or a lone process."""
    return int(os.environ.get("RANK", 0)) == 0


def _rows_per_rank(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) does not split evenly over {world_size} "
                         f"processes: use a multiple of {world_size}")
    return batch_size // world_size


def shard(whole, rank: int, world_size: int):
    """This rank's rows of a whole-batch tensor or list: equal shares, in rank order."""
    rows = _rows_per_rank(len(whole), world_size)
    return whole[rank * rows:(rank + 1) * rows]


def mean_over_ranks(values: dict, device) -> dict:
    """Each number averaged over the processes, in one all-reduce: with equal shares, the whole batch's mean."""
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(total)  # a sum: gloo has no average
    return dict(zip(values, (total / dist.get_world_size()).tolist()))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
