"""Optimisers and learning-rate schedules, built from the ``optim`` and ``sched`` config groups."""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(cfg, global_batch_size: int) -> float:
    """``optim.lr`` scaled linearly from ``optim.base_batch_size`` to the real global batch (Goyal et al.)."""
    if cfg.base_batch_size is None:
        return cfg.lr
    return cfg.lr * global_batch_size / cfg.base_batch_size


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases and norm scales are the 1-d parameters; decaying them only hurts.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: nn.Module, global_batch_size: int) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, global_batch_size)
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(cfg, step: int, steps_per_epoch: int, total_steps: int, base_lr: float) -> float:
    """The multiplier of the base lr after ``step`` optimizer steps.

    The decay runs over all steps; the warmup multiplies it during the first ``warmup_epochs``
    (``warmup_epochs * steps_per_epoch`` steps, not rounded: the lr at a given fraction of an epoch is
    the same at any batch size), rising linearly from ``warmup_ratio`` to 1 (mmcv's linear warmup, as
    in the official recipe).
    """
    if cfg.name == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:  # step
        epoch = step // max(steps_per_epoch, 1)
        factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        factor *= 1 - (1 - step / warmup_steps) * (1 - cfg.warmup_ratio)
    return factor


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    max_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration schedule: call ``step()`` after every optimizer step.

    The factor is a closure, not a callable object, so that LambdaLR's state_dict holds only the
    step count: resuming with a longer ``trainer.max_epochs`` stretches the schedule to the new
    length instead of restoring the old one.
    """
    total = steps_per_epoch * max_epochs
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total, base_lr))
