"""The recipes mean the same at any batch size: the warmup is in epochs, and a checkpoint from
before that (``sched.warmup_iters``) still evaluates, and resumes only on its own schedule."""

import math

import pytest
import torch
from torch import nn

from rednet.engine.evaluate import evaluate_trained
from rednet.engine.optim import build_optimizer, build_scheduler, lr_factor
from rednet.engine.trainer import Trainer
from rednet.errors import CheckpointError
from tests.conftest import FAST, command_config, compose_config

IMAGES = 2048 * 16  # a training set whose epoch is 128 steps at batch 256 and 16 at 2048


def factors(cfg, batch: int, epochs: int) -> dict[float, float]:
    """The lr divided by the scaled base lr, keyed by the epoch (a fraction) at which it is used."""
    steps_per_epoch = IMAGES // batch
    opt = build_optimizer(cfg.optim, nn.Linear(2, 2), batch)
    sched = build_scheduler(cfg.sched, opt, steps_per_epoch, epochs)
    out = {}
    for step in range(steps_per_epoch * epochs):
        out[step / steps_per_epoch] = opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"]
        opt.step()
        sched.step()
    return out


def test_the_official_warmup_is_five_epochs_at_any_batch():
    cfg = compose_config(["experiment=rednet26_imagenet", "trainer.max_epochs=10"])
    assert cfg.sched.warmup_epochs == 5
    small, large = factors(cfg, 256, 10), factors(cfg, 2048, 10)
    assert set(large) <= set(small)  # every epoch fraction of 2048's steps is one of 256's
    for epoch in large:
        cosine = 0.5 * (1 + math.cos(math.pi * epoch / 10))
        warm = 1 - (1 - epoch / 5) * (1 - 0.25) if epoch < 5 else 1.0
        assert small[epoch] == pytest.approx(large[epoch]) == pytest.approx(cosine * warm), epoch
    assert small[0.0] == pytest.approx(0.25)
    assert small[2.5] == pytest.approx(0.625 * 0.5 * (1 + math.cos(0.25 * math.pi)))
    # The official run: 626 steps an epoch at 2048 (1,281,167 images), 3,130 warmup iterations.
    assert lr_factor(cfg.sched, 3129, 626, 626 * 130, 0.8) < lr_factor(cfg.sched, 3130, 626, 626 * 130, 0.8)
    assert lr_factor(cfg.sched, 3130, 626, 626 * 130, 0.8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 130)))


def test_the_cifar_recipe_warms_up_one_epoch():
    cfg = compose_config(["experiment=rednet26_cifar10", "trainer.max_epochs=4"])
    assert cfg.sched.warmup_epochs == 1
    for batch in (128, 1024):
        seen = factors(cfg, batch, 4)
        assert seen[0.5] < seen[0.875] < 1 and seen[1.0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


TINY = FAST + ["data=digits", "model=rednet18", "data.batch_size=32", "trainer.limit_train_batches=4",
               "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    """A run's last.pt as the code before warmup epochs wrote it: its config says sched.warmup_iters=8."""
    run = tmp_path_factory.mktemp("old") / "run"
    Trainer(compose_config(TINY + ["trainer.max_epochs=1", "sched.warmup_epochs=2"]), run).fit()
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["sched"]["warmup_epochs"]
    ckpt["config"]["sched"]["warmup_iters"] = 8  # 2 epochs of 4 steps
    torch.save(ckpt, path)
    return path


def test_an_old_checkpoint_evaluates(old_checkpoint, tmp_path):
    cfg, trained = command_config("eval", [*FAST, f"ckpt={old_checkpoint}", "trainer.limit_val_batches=1"])
    result = evaluate_trained(cfg, trained, tmp_path)
    assert 0 <= result.acc1 <= 1


def test_an_old_checkpoint_resumes_only_on_its_own_warmup(old_checkpoint, tmp_path):
    resume = TINY + ["trainer.max_epochs=3", f"resume={old_checkpoint}"]
    with pytest.raises(CheckpointError) as error:
        Trainer(compose_config(resume), tmp_path / "a")
    assert str(error.value) == (f"{old_checkpoint} was trained with sched.warmup_iters=8, which is 2 epochs of 4 "
                                f"steps; warmups are in epochs now: resume with sched.warmup_epochs=2, or start a "
                                f"new run")
    assert "\n" not in str(error.value)
    trainer = Trainer(compose_config(resume + ["sched.warmup_epochs=2"]), tmp_path / "b")
    assert trainer.step == 4
    expected = 0.1 * 32 / 256 * (1 - (1 - 4 / 8) * 0.9) * 0.5 * (1 + math.cos(math.pi * 4 / 12))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    # Past both warmups the schedule is the same whatever the warmup was: it resumes as it is.
    ckpt = torch.load(old_checkpoint, weights_only=True)
    ckpt["config"]["sched"]["warmup_iters"] = 2
    torch.save(ckpt, tmp_path / "short.pt")
    short = TINY + ["trainer.max_epochs=3", f"resume={tmp_path / 'short.pt'}"]
    assert Trainer(compose_config(short + ["sched.warmup_epochs=0"]), tmp_path / "c").step == 4
    with pytest.raises(CheckpointError, match="resume with sched.warmup_epochs=0.5, or"):
        Trainer(compose_config(short + ["sched.warmup_epochs=2"]), tmp_path / "d")
