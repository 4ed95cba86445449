"""What the README promises and no other test checks, each through the path a user takes."""

import json
import math
import os
import shutil

import pytest
import torch

from rednet.engine.evaluate import evaluate_trained
from rednet.engine.trainer import Trainer
from rednet.errors import CheckpointError
from rednet.models import create_model
from tests.conftest import FAST, command_config, compose_config
from tests.fakedata import make_cifar, make_imagefolder, write_corrupt_image

TINY = FAST + ["model=rednet18", "trainer.max_epochs=1"]


def test_eval_takes_single_data_keys_on_top_of_the_checkpoint(tmp_path):
    # "python eval.py ckpt=.../best.pt data.root=/other/copy": the data moved, the rest is the checkpoint's.
    first = make_cifar(tmp_path / "first", n_train=20, n_test=10)
    run = tmp_path / "run"
    Trainer(compose_config(TINY + ["data=cifar10", f"data.root={first}", "data.download=false", "data.batch_size=5",
                                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]), run).fit()
    moved = make_cifar(tmp_path / "moved", n_train=10, n_test=30, seed=1)
    shutil.rmtree(first)
    overrides = [f"ckpt={run}/checkpoints/last.pt", f"data.root={moved}", "trainer.device=cpu"]
    cfg, trained = command_config("eval", overrides)
    assert (cfg.model.name, cfg.data.name, cfg.data.root, cfg.data.batch_size, cfg.data.download) == \
        ("rednet18", "cifar10", moved, 5, False)
    evaluate_trained(cfg, trained, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["count"] == 30  # the moved copy's whole test split, not the training run's one batch


def test_resume_refuses_data_whose_classes_are_named_differently(tmp_path):
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog", "fox"), n_train=2, n_val=1)
    common = TINY + ["data=imagenet", f"data.root={root}", "data.image_size=16", "data.val_resize=16",
                     "data.batch_size=3"]
    Trainer(compose_config(common), tmp_path / "run").fit()
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "fox"), os.path.join(root, split, "wolf"))
    last = tmp_path / "run/checkpoints/last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt was trained on other classes than data=imagenet has: "
                                              r"class 2 is 'fox' there and 'wolf' here"):
        Trainer(compose_config(common + ["trainer.max_epochs=2", f"resume={last}"]), tmp_path / "again")


def test_unreadable_images_are_skipped_in_training(tmp_path, caplog):
    # data.bad_images=skip, end to end: through the real ImageFolder, collate and training loop. With
    # one image per batch, an unreadable image is a batch with nothing in it.
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog"), n_train=3, n_val=2, size=(16, 16))
    write_corrupt_image(os.path.join(root, "train", "cat", "cat_bad.jpg"))
    write_corrupt_image(os.path.join(root, "train", "dog", "dog_bad.jpg"), kind="truncated")
    write_corrupt_image(os.path.join(root, "val", "dog", "dog_bad.jpg"))
    cfg = compose_config(TINY + ["data=imagenet", f"data.root={root}", "data.image_size=16", "data.val_resize=16",
                                 "data.batch_size=1", "data.bad_images=skip"])
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned, caplog.at_level("INFO"):
        metrics = Trainer(cfg, tmp_path / "run").fit()
    named = " ".join(str(w.message) for w in warned)
    assert all(f"{split}/{c}/{c}_bad.jpg" in named for split, c in [("train", "cat"), ("train", "dog"), ("val", "dog")])
    assert metrics["step"] == 6  # 8 training batches, 2 of them empty
    assert caplog.text.count("no readable image in batch") == 2
    assert math.isfinite(metrics["train"]["loss"]) and metrics["val"]["count"] == 4  # the 4 readable ones


def test_pretrained_weights_with_drop_head_through_the_config(tmp_path):
    torch.manual_seed(1)
    source = create_model("rednet18", num_classes=5, in_chans=1, cifar_stem=True)
    torch.save({"model": source.state_dict()}, tmp_path / "pretrained.pt")
    common = TINY + ["data=digits", f"model.pretrained={tmp_path}/pretrained.pt"]
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight .*model\.drop_head=true"):
        Trainer(compose_config(common), tmp_path / "refused")
    model = Trainer(compose_config(common + ["model.drop_head=true"]), tmp_path / "run").model
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            assert loaded[key].shape[0] == 10  # digits' 10 classes: a fresh classifier
        else:
            assert torch.equal(loaded[key], value), key


def test_resume_with_more_epochs_stretches_the_schedule(tmp_path):
    # Cosine over 2 epochs, resumed for 4: the lr continues on the 4-epoch curve, halfway down
    # (the 2-epoch curve would have it at 0).
    common = TINY + ["data=digits", "data.batch_size=32", "trainer.limit_train_batches=3",
                     "trainer.limit_val_batches=1", "sched.warmup_epochs=0", "optim.base_batch_size=null",
                     "optim.lr=0.1"]
    Trainer(compose_config(common + ["trainer.max_epochs=2"]), tmp_path / "run").fit()
    resumed = Trainer(compose_config(common + ["trainer.max_epochs=4", f"resume={tmp_path}/run/checkpoints/last.pt"]),
                      tmp_path / "again")
    assert resumed.step == 6
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 12)))
    resumed.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 12)))


def test_rednet26_cifar10_recipe_composes_and_trains_a_step(tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=20, n_test=10)
    cfg = compose_config(FAST + ["experiment=rednet26_cifar10", f"data.root={root}", "data.download=false",
                                 "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                 "trainer.limit_val_batches=1"])
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.optim.lr, cfg.optim.base_batch_size,
            cfg.optim.nesterov, cfg.optim.weight_decay) == ("rednet26", "cifar10", "sgd", 0.1, 128, True, 5e-4)
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.trainer.label_smoothing) == ("cosine", 1, 0.1)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 4 / 128)
    assert trainer.optimizer.defaults["nesterov"] and trainer.criterion.label_smoothing == 0.1
    before = trainer.model.head.fc.weight.detach().clone()
    metrics = trainer.fit()
    assert metrics["step"] == 1 and math.isfinite(metrics["train"]["loss"])
    assert not torch.equal(trainer.model.head.fc.weight, before)
    assert trainer.model.backbone.stem[0].conv.stride == (1, 1)  # 32 px: the CIFAR stem
