"""End-to-end training on the CPU: digits, a CIFAR-format folder and an ImageFolder of JPEGs."""

import csv
import json
import os

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rednet.engine.trainer import Trainer
from rednet.io import read_checkpoint
from tests.conftest import compose_config, run_cli, tiny
from tests.fakedata import make_cifar, make_imagefolder

TINY = tiny(batch_size=32, train_batches=3, val_batches=2)


def train(tmp_path, overrides, name="run"):
    cfg = compose_config(TINY + overrides)
    run_dir = tmp_path / name
    Trainer(cfg, run_dir).fit()
    return run_dir


def test_one_epoch_on_digits_writes_the_run_folder(tmp_path):
    run = train(tmp_path, ["data=digits", "trainer.max_epochs=1", "trainer.ema=true"])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("acc1", "acc5", "loss"):
        assert 0 <= metrics["val"][key] if key == "loss" else 0 <= metrics["val"][key] <= 1
    assert metrics["best"]["acc1"] == metrics["val"]["acc1"]
    assert metrics["train"]["images_per_s"] > 0
    assert metrics["val"]["count"] == 64  # 2 batches of 32
    assert "val_ema" in metrics

    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "rng", "config", "metrics",
            "class_names"} <= set(ckpt)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert ckpt["config"]["model"]["name"] == "rednet18" and ckpt["config"]["data"]["name"] == "digits"
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert (run / "checkpoints" / "best.pt").is_file()

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc1", "lr", "val/loss", "val/acc1", "val/acc5", "val_ema/acc1",
            "perf/images_per_s", "perf/epoch_time_s"} <= scalars
    assert "val/confusion_matrix" in events.Tags()["images"]


def test_cifar_format_folder_trains_without_download(tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=100, n_test=40)
    run = train(tmp_path, ["data=cifar10", f"data.root={root}", "data.download=false", "trainer.max_epochs=1",
                           "data.batch_size=16"])
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    # 32 px data picks the CIFAR stem: stride 1 in the first conv.
    assert ckpt["model"]["backbone.stem.0.conv.weight"].shape == (32, 3, 3, 3)
    assert ckpt["class_names"][:2] == ["airplane", "automobile"]
    assert ckpt["model"]["head.fc.weight"].shape[0] == 10


def test_imagefolder_of_jpegs_trains(tmp_path):
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog", "fox"), n_train=6, n_val=3)
    run = train(tmp_path, ["data=imagenet", f"data.root={root}", "data.image_size=64", "data.val_resize=72",
                           "data.batch_size=6", "trainer.max_epochs=1"])
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["class_names"] == ["cat", "dog", "fox"]
    assert ckpt["model"]["head.fc.weight"].shape == (3, 512)  # num_classes comes from the data

    # The same number of classes under other names: output 2 means "fox", whatever the folder says.
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "fox"), os.path.join(root, split, "aardvark"))
    result = run_cli("eval.py", f"ckpt={run}/checkpoints/best.pt", f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained on other classes than data=imagenet has: class 0 is 'cat' there and 'aardvark' here" \
        in result.stderr


def test_resume_continues_exactly(tmp_path):
    # A schedule that does not depend on max_epochs, so that 2 epochs + resume to 4 is the same
    # run as 4 straight; warmup, momentum, EMA and the sampler order all have to carry over.
    common = ["data=digits", "data.batch_size=16", "sched=step", "sched.milestones=[3]", "sched.warmup_epochs=1.5",
              "trainer.ema=true", "model.drop_path_rate=0.1"]
    straight = train(tmp_path, common + ["trainer.max_epochs=4"], "straight")
    first = train(tmp_path, common + ["trainer.max_epochs=2"], "first")
    resumed = train(tmp_path, common + ["trainer.max_epochs=4", f"resume={first}/checkpoints/last.pt"], "resumed")
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert b["epoch"] == 4 and b["step"] == a["step"] == 12
    assert b["val"] == a["val"]
    assert b["val_ema"] == a["val_ema"]
    sa = read_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    sb = read_checkpoint(resumed / "checkpoints" / "last.pt")["model"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_eval_reproduces_training_top1_and_writes_report(tmp_path):
    # The run validates on digits' whole test split, as eval.py does: the same 360 images.
    run = train(tmp_path, ["data=digits", "trainer.max_epochs=1", "trainer.limit_val_batches=null"])
    reported = json.loads((run / "metrics.json").read_text())["val"]
    out = tmp_path / "eval"
    result = run_cli("eval.py", f"ckpt={run}/checkpoints/best.pt", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == reported["count"] == 360
    assert metrics["acc1"] == reported["acc1"] and metrics["acc5"] == reported["acc5"]
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-6)
    assert len(metrics["per_class"]) == 10 and sum(r["support"] for r in metrics["per_class"]) == 360
    with open(out / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted"] + [str(i) for i in range(10)]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(10)]
    counts = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert [sum(row) for row in counts] == [r["support"] for r in metrics["per_class"]]
    assert sum(counts[i][i] for i in range(10)) == round(metrics["acc1"] * 360)
    assert Image.open(out / "confusion_matrix.png").size[0] > 500
    assert Image.open(out / "misclassified.png").size[0] > 500  # a grid of mistakes, or the note that there are none
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "top-1" in result.stdout and "| 0 |" in result.stdout


def test_eval_official_mmcls_checkpoint_with_overrides(tmp_path):
    from rednet.models import create_model

    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog", "fox"), n_train=1, n_val=2)
    model = create_model("rednet26", num_classes=3)
    torch.save({"meta": {"mmcls_version": "0.x"}, "state_dict": model.state_dict()}, tmp_path / "official.pth")
    out = tmp_path / "eval"
    result = run_cli("eval.py", f"ckpt={tmp_path}/official.pth", "model=rednet26", "data=imagenet",
                     f"data.root={root}", "data.image_size=64", "data.val_resize=64", "data.num_workers=0",
                     "trainer.device=cpu", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 6 and metrics["model"] == "rednet26"
    assert [r["class"] for r in metrics["per_class"]] == ["cat", "dog", "fox"]
