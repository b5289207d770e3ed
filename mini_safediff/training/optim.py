"""The optimizers and schedules of train.py and attack.py: AdamW (fused, or with bfloat16 moments), the
learning-rate schedule, EMA of the weights."""
import math

import torch


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))



class EMA:
    """Exponential moving average of the trained weights (float32 copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for key, value in model.state_dict().items():
            self.shadow[key].lerp_(value.float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict):
        self.decay, self.shadow = state["decay"], state["shadow"]


class AdamWBF16(torch.optim.Optimizer):
    """torch.optim.AdamW (same formulas, defaults and order of operations) with both moment estimates stored in
    bfloat16: 4 bytes of optimizer state a parameter instead of 8. The update is computed in float32 and applied to
    the float32 weights. The states are stored with stochastic rounding: rounded to nearest, the second moment
    could neither decay (0.999 v rounds back to v with bfloat16's 8 significant bits) nor grow by less than ~0.2%
    a step; rounded at random, it does both in expectation. The random bits come from a generator seeded with the
    step number, so every DDP rank rounds alike and a resumed run goes on exactly."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for p in (p for group in self.param_groups for p in group["params"]):
            if p.dtype != torch.float32:
                raise ValueError(f"AdamWBF16 keeps float32 weights; got a {p.dtype} parameter {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        rounding = {}  # device -> generator
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = state["step"].item()
                if p.device not in rounding:
                    rounding[p.device] = torch.Generator(p.device).manual_seed(int(step))
                p.mul_(1 - lr * weight_decay)
                exp_avg = state["exp_avg"].float().lerp_(p.grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().div_((1 - beta2 ** step) ** 0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
                state["exp_avg"] = round_to_bfloat16(exp_avg, rounding[p.device])
                state["exp_avg_sq"] = round_to_bfloat16(exp_avg_sq, rounding[p.device])

    def load_state_dict(self, state_dict: dict):
        super().load_state_dict(state_dict)  # which casts the states to the parameters' float32
        for state in self.state.values():
            state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].bfloat16(), state["exp_avg_sq"].bfloat16()


def adamw(params, lr: float, weight_decay: float, bf16_state: bool = False) -> torch.optim.Optimizer:
    """The optimizer of train.py and attack.py: AdamWBF16 with bf16_state, else torch's fused AdamW. Fused, the step
    is one kernel over all weights: on CUDA without the weights-sized temporaries of torch's default (foreach)
    AdamW, on the CPU about 10x faster than its default per-tensor loop (benchmarks/optimizer_step.py); equal to
    them up to float rounding."""
    params = list(params)
    if bf16_state:
        return AdamWBF16(params, lr=lr, weight_decay=weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # the devices with a fused AdamW kernel
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def round_to_bfloat16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16 (the upper 16 bits), rounded up with probability (lower 16 bits) / 2^16 and down
    otherwise, so that the expected value is x: random lower bits are added, then cut off."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    # in place: at SD size the temporaries of the largest weight are 118 MB each
    return noise.add_(x.view(torch.int32)).bitwise_and_(-(1 << 16)).view(torch.float32).bfloat16()
