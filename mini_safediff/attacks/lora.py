"""LoRA (Hu et al. 2021) on the UNet's attention projections, as an attacker would fine-tune cheaply.

A LoRA layer keeps the frozen base weight under its usual key (`...to_q.weight`) and adds
`lora_A` (r, in) and `lora_B` (out, r): y = W x + b + scale * B A x, scale = alpha / r. B starts at
zero, so the model starts exactly at the base. A merged model holds W + scale * B A in the plain Linear's place.
"""
import torch
from torch import nn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections of every transformer block


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.scale = alpha / rank
        bound = 1 / base.in_features ** 0.5  # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear and peft use
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(base.weight.device, base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))

    def forward(self, x):
        return super().forward(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * self.lora_B @ self.lora_A


def _targets(unet: nn.Module, layer_type):
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, layer_type) and name.endswith(TARGETS) and ".attn" in name]


def _replace(unet: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(unet.get_submodule(parent), child, new)


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> list:
    """Freeze the UNet and put LoRA layers on its attention projections; returns the trainable parameters."""
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in _targets(unet, nn.Linear):
        _replace(unet, name, LoRALinear(linear, rank, alpha or rank, generator))
    trainable = [p for name, p in unet.named_parameters() if ".lora_" in name]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def lora_state_dict(unet: nn.Module) -> dict:
    return {k: v for k, v in unet.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merged_state_dict(unet: nn.Module) -> dict:
    """The UNet's state dict with every LoRA layer merged (W + scale * B A), in the keys of a plain UNet."""
    state_dict = {k: v for k, v in unet.state_dict().items() if ".lora_" not in k}
    for name, layer in _targets(unet, LoRALinear):
        state_dict[f"{name}.weight"] = layer.merged_weight()
    return state_dict
