"""Training learns: a short real run on digits, and what it records, read back by TensorBoard's own reader.

One run serves every test here (about 2,900 training images through RedNet-18). Measured on this
project's CPU: 96% top-1 on the 360 held-out images after these two epochs, against 14% with
``optimizer.step`` made a no-op or with every gradient zeroed (chance is 10%).
"""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from rednet.engine.trainer import Trainer
from tests.conftest import FAST, compose_config

LR, EPOCHS, BATCH, WARMUP_EPOCHS = 4e-3, 2, 32, 0.2
STEPS_PER_EPOCH = 1437 // BATCH  # digits' training split, incomplete batch dropped


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("learning") / "run"
    cfg = compose_config(FAST + ["data=digits", "model=rednet18", "optim=adamw", f"optim.lr={LR}",
                                 f"data.batch_size={BATCH}", f"trainer.max_epochs={EPOCHS}",
                                 f"sched.warmup_epochs={WARMUP_EPOCHS}"])
    metrics = Trainer(cfg, run_dir).fit()
    return run_dir, metrics


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_training_learns_digits(run):
    run_dir, metrics = run
    assert metrics["val"]["count"] == 360
    assert metrics["val"]["acc1"] >= 0.9
    assert metrics["train"]["loss"] < 0.5 * math.log(10)  # from chance level, ln(10)
    curve = [v for _, v in scalars(EventAccumulator(str(run_dir / "tensorboard")).Reload(), "train/loss")]
    assert curve[-1] < 0.5 * curve[0]


def test_tensorboard_scalars_and_images_read_back(run):
    run_dir, metrics = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()

    for key in ("acc1", "acc5", "loss"):
        logged = scalars(events, f"val/{key}")
        assert [step for step, _ in logged] == list(range(1, EPOCHS + 1))  # one point per epoch
        assert logged[-1][1] == pytest.approx(metrics["val"][key], rel=1e-6)
    assert scalars(events, "perf/images_per_s")[-1][1] == pytest.approx(metrics["train"]["images_per_s"], rel=1e-6)

    # Training curves every 10 steps and at the end of each epoch; the lr after the warmup as the
    # schedule defines it: cosine from LR to 0 over all steps (stepped after each update).
    total = EPOCHS * STEPS_PER_EPOCH
    expected_steps = sorted({s for s in range(10, total + 1, 10)} | {STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)})
    assert [step for step, _ in scalars(events, "train/loss")] == expected_steps
    assert [step for step, _ in scalars(events, "lr")] == expected_steps
    assert expected_steps[0] >= WARMUP_EPOCHS * STEPS_PER_EPOCH
    for step, lr in scalars(events, "lr"):
        assert lr == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-5, abs=1e-9), step

    images = events.Images("val/confusion_matrix")
    assert [image.step for image in images] == list(range(1, EPOCHS + 1))
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    assert images[-1].width == 2 * images[-1].height >= 1000  # counts and recall side by side


def test_tensorboard_hparams_read_back(run):
    run_dir, metrics = run
    # add_hparams writes into a run of its own, so the hparams table has one row per training run.
    events = EventAccumulator(str(run_dir / "tensorboard" / "hparams")).Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
              for name, value in start.hparams.items()}
    assert values == {"model": "rednet18", "data": "digits", "optim": "adamw", "lr": pytest.approx(LR),
                      "batch_size": BATCH, "epochs": EPOCHS, "precision": "auto"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"hparam/val_acc1", "hparam/best_acc1"}
    assert scalars(events, "hparam/val_acc1")[-1][1] == pytest.approx(metrics["val"]["acc1"], rel=1e-6)
    assert scalars(events, "hparam/best_acc1")[-1][1] == pytest.approx(metrics["best"]["acc1"], rel=1e-6)
