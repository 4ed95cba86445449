"""Optimisers and schedules, against closed forms."""

import math

import pytest
import torch
from torch import nn

from rednet.engine.optim import build_optimizer, build_scheduler
from tests.conftest import compose_config


def lrs(cfg, steps_per_epoch, epochs, batch):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(cfg.optim, model, batch)
    sched = build_scheduler(cfg.sched, opt, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return opt, out


def test_sgd_lr_scales_linearly_with_the_global_batch():
    cfg = compose_config(["data=digits"])
    opt, _ = lrs(cfg, 1, 1, batch=64)
    assert opt.defaults["lr"] == pytest.approx(0.1 * 64 / 256)
    official = compose_config(["experiment=rednet26_imagenet", "data.batch_size=256"])
    opt, _ = lrs(official, 1, 1, batch=256)
    assert opt.defaults["lr"] == pytest.approx(0.8 * 256 / 2048)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_cosine_with_linear_warmup():
    cfg = compose_config(["sched=cosine", "sched.warmup_epochs=1", "sched.warmup_ratio=0.25",
                          "optim.base_batch_size=null"])
    _, seen = lrs(cfg, steps_per_epoch=10, epochs=5, batch=128)
    total = 50
    for step in (0, 5, 10, 30, 49):
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        warm = 1 - (1 - step / 10) * 0.75 if step < 10 else 1.0
        assert seen[step] == pytest.approx(0.1 * cosine * warm)
    assert seen[0] == pytest.approx(0.025)


def test_cosine_decays_to_min_lr():
    cfg = compose_config(["sched=cosine", "sched.min_lr=0.02", "optim.base_batch_size=null"])
    _, seen = lrs(cfg, steps_per_epoch=10, epochs=2, batch=128)
    total = 20
    for step in (0, 7, 13, 19):
        assert seen[step] == pytest.approx(0.02 + (0.1 - 0.02) * 0.5 * (1 + math.cos(math.pi * step / total)))
    assert min(seen) > 0.02


def test_step_schedule_by_epoch():
    cfg = compose_config(["sched=step", "sched.milestones=[2,4]", "sched.gamma=0.1", "optim.base_batch_size=null"])
    _, seen = lrs(cfg, steps_per_epoch=3, epochs=5, batch=128)
    assert seen[::3] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_no_weight_decay_on_norm_and_bias():
    cfg = compose_config(["optim=adamw"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    opt = build_optimizer(cfg.optim, model, 128)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and [p.shape for p in decayed["params"]] == [torch.Size([8, 3, 3, 3])]
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 3
