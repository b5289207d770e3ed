"""Plain ascent, the study's naive baseline (the official code's "high safety" without the contrastive term):
the diffusion loss on clean rows, made high on harmful ones.

  loss = mean_i w_i MSE(p_i, target_i)          w = 1 clean, --harmful-weight harmful (-0.5: ascent)

It is LT's loss with lambda 0, and it trains the same weights as `--method lt --lambda 0` except for the random
numbers: LT draws its class centres from the run's generator first, this draws none.
"""
import torch

from ..training.steps import mse
from .method import HARMFUL_WEIGHT, Method


class NaiveAscent(Method):
    help = "naive: ascent on harmful rows alone (--harmful-weight), no contrastive term"
    options = (HARMFUL_WEIGHT,)
    default_preset = "naive"

    def loss(self, pred, batch):
        harmful = batch.harmful.to(pred.device, torch.bool)
        per_row = mse(pred, self.pipe.schedule.target(batch.x0, batch.noise, batch.t), per_row=True)
        loss = (torch.where(harmful, self.args.harmful_weight, 1.0) * per_row).mean()
        return loss, {"loss": loss.item(), "mse": per_row.mean().item()}
