"""What keeps a run's checkpoint trustworthy when it is interrupted or diverges (train.py and attack.py).

- Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary: the step in progress finishes,
  a checkpoint of that boundary is written, and --resume then continues exactly as an uninterrupted run would.
  A second Ctrl-C stops at once (the last checkpoint stays as it was).
- A checkpoint that falls due at step k is written only once step k's weights have given a finite loss and
  gradient (during step k + 1, before its update), so an update that made the weights huge or non-finite is
  never saved as "good". A non-finite loss or gradient stops the run before the update, naming the checkpoint
  that holds the last good state.
"""
import math
import signal

import torch


class StopRequest:
    """A context in which the first SIGINT / SIGTERM only sets `requested`; the loop polls it between steps.
    Nested (a training run by the study runner), the request reaches every enclosing one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # asked twice: stop now
            raise KeyboardInterrupt
        self.requested = True
        outer = getattr(self._previous.get(signum), "__self__", None)
        if isinstance(outer, StopRequest):  # a training inside a study: the study stops too, once this one has
            outer.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after the step in progress (again to stop at once)",
              flush=True)

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ddp: bool, device) -> bool:
        """Whether to stop now; under DDP, whether any rank was asked (all ranks stop at the same boundary)."""
        if not ddp:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def all_finite(parameters) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in parameters)


def divergence(loss: float, grad_norm: float) -> str | None:
    """Why a step must not be taken, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def last_good(checkpoint_path, step: int | None) -> str:
    return (f"the last good checkpoint is {checkpoint_path} (step {step}); continue from it with --resume"
            if step is not None else "no checkpoint was written by this run")
