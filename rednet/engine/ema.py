"""An exponential moving average of the weights, validated alongside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """Keeps ``module``, a copy of the model whose weights trail the trained ones.

    The decay ramps up as (1 + n) / (10 + n) over the first updates, so the average is not
    dominated by the random initialisation in short runs. Buffers (BN statistics) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = float(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
