"""Faults: preemption signals, a full disk, non-finite losses. Nothing is lost, and each ends in one clear line."""

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rednet import io as ckpt_io
from rednet.engine.trainer import NonFiniteLossError, Trainer
from rednet.errors import CheckpointError
from rednet.io import read_checkpoint, save_checkpoint
from tests.conftest import FAST, ROOT, compose_config

RUN = ["data=digits", "model=rednet18", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
       "trainer.limit_val_batches=3", "trainer.progress=none", "trainer.device=cpu"]


@pytest.mark.slow  # three train.py processes
def test_sigterm_saves_and_resume_auto_finishes_like_an_uninterrupted_run(tmp_path):
    def train(*extra, cwd):
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = train("hydra.run.dir=straight", cwd=tmp_path)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    work = tmp_path / "work"
    work.mkdir()
    proc = train("trainer.save_every_n_steps=2", "hydra.run.dir=outputs/first", cwd=work)
    last = work / "outputs/first/checkpoints/last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "resume=auto" in errors[0]
    state = read_checkpoint(last)
    assert state["epoch"] * 6 + state["batch_in_epoch"] == state["step"] < 12  # stopped part-way

    resumed = train("resume=auto", "hydra.run.dir=outputs/resumed", cwd=work)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    a = json.loads((tmp_path / "straight/metrics.json").read_text())
    b = json.loads((work / "outputs/resumed/metrics.json").read_text())
    assert (b["epoch"], b["step"], b["val"]) == (a["epoch"], a["step"], a["val"])


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*last.pt: No space left on device; "
                                              "the previous checkpoint there is intact"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_full_disk_inside_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f):  # what torch.save's zip writer raises when the disk fills up
        f.write(b"partial bytes")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1236 vs 1132") from None

    monkeypatch.setattr(ckpt_io.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*last.pt: No space left on device; "
                                              "the previous checkpoint there is intact"):
        save_checkpoint({"epoch": 2}, path)
    assert read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_save_keeps_the_previous_as_prev(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert read_checkpoint(path)["epoch"] == 2
    assert read_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1


def nan_on_calls(trainer, calls):
    criterion, count = trainer.criterion, {"n": 0}

    def loss(logits, target):
        count["n"] += 1
        value = criterion(logits, target)
        return value * float("nan") if count["n"] in calls else value

    trainer.criterion = loss


def test_non_finite_loss_stops_naming_the_step_and_checkpoint(tmp_path):
    trainer = Trainer(compose_config(FAST + RUN), tmp_path / "run")
    nan_on_calls(trainer, {8})  # step 2 of epoch 2, after the epoch-1 checkpoint
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 8 \(epoch 2\); the last good checkpoint is "
                                                 r".*checkpoints/last.pt; .*trainer.max_bad_steps=N"):
        trainer.fit()
    assert read_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1


def test_non_finite_loss_can_be_skipped(tmp_path):
    trainer = Trainer(compose_config(FAST + RUN + ["trainer.max_bad_steps=2"]), tmp_path / "run")
    nan_on_calls(trainer, {2, 9})
    metrics = trainer.fit()
    assert metrics["epoch"] == 2 and metrics["step"] == 10  # two batches skipped
    assert torch.isfinite(torch.tensor(metrics["val"]["loss"]))


class EmptyBatches:
    """The train loader, with the batches numbered in ``calls`` emptied, as SkipNone collates a
    batch of unreadable images."""

    def __init__(self, loader, calls):
        self.loader, self.calls, self.sampler = loader, calls, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, (images, target) in enumerate(self.loader, 1):
            yield (images[:0], target[:0]) if i in self.calls else (images, target)


def test_empty_batch_is_skipped_not_counted_as_non_finite(tmp_path, caplog):
    trainer = Trainer(compose_config(FAST + RUN), tmp_path / "run")  # max_bad_steps=0: a NaN would stop it
    trainer.train_loader = trainer.train_batches.loader = EmptyBatches(trainer.train_loader, {3})
    with caplog.at_level("INFO"):
        metrics = trainer.fit()
    assert metrics["epoch"] == 2 and metrics["step"] == 10  # one batch per epoch skipped
    assert "warning: no readable image in batch 3 of epoch 1; batch skipped" in caplog.text
    assert torch.isfinite(torch.tensor(metrics["train"]["loss"]))
    assert torch.isfinite(torch.tensor(metrics["val"]["loss"]))


def test_resume_refuses_another_model_or_optimizer(tmp_path):
    Trainer(compose_config(FAST + RUN + ["trainer.max_epochs=1"]), tmp_path / "run").fit()
    last = tmp_path / "run/checkpoints/last.pt"
    for override, message in [("model=resnet18", "was trained with model=rednet18, not model=resnet18"),
                              ("optim=adamw", "was trained with optim=sgd, not optim=adamw; resume with optim=sgd")]:
        with pytest.raises(CheckpointError, match=message):
            Trainer(compose_config(FAST + RUN + [override, f"resume={last}"]), tmp_path / "again")


def test_resume_auto_reads_the_config_of_runs_without_a_hydra_folder(tmp_path, monkeypatch):
    from rednet.engine.checkpointing import find_last_checkpoint

    monkeypatch.chdir(tmp_path)
    for run, model in [("old", "rednet18"), ("new", "rednet26")]:  # "new" is written last
        save_checkpoint({"config": {"model": {"name": model}, "data": {"name": "digits"}}},
                        tmp_path / "outputs" / run / "checkpoints" / "last.pt")
    assert find_last_checkpoint(compose_config(RUN)) == Path("outputs/old/checkpoints/last.pt")
    with pytest.raises(CheckpointError, match="resume=auto found no checkpoints/last.pt of model=resnet18"):
        find_last_checkpoint(compose_config(RUN + ["model=resnet18"]))


def test_an_epoch_with_every_batch_skipped_says_so(tmp_path, caplog):
    trainer = Trainer(compose_config(FAST + RUN + ["trainer.max_bad_steps=100"]), tmp_path / "run")
    nan_on_calls(trainer, set(range(7, 13)))  # all of epoch 2
    with caplog.at_level("INFO"):
        metrics = trainer.fit()
    assert metrics["step"] == 6 and metrics["train"]["loss"] is None
    assert "epoch 2/2: train: every batch skipped" in caplog.text
    assert "non-finite loss in batch 6 of epoch 2, batch skipped (6/100)" in caplog.text
    json.loads((tmp_path / "run/metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_metrics_json_writes_a_diverged_loss_as_null():
    from rednet.io import to_json

    text = to_json({"val": {"loss": float("nan"), "acc1": 0.5}, "inf": [float("inf"), 1.0]})
    assert json.loads(text, parse_constant=pytest.fail) == {"val": {"loss": None, "acc1": 0.5}, "inf": [None, 1.0]}


def test_resume_past_max_epochs_says_nothing_is_left(tmp_path, caplog):
    Trainer(compose_config(FAST + RUN + ["trainer.max_epochs=1"]), tmp_path / "run").fit()
    with caplog.at_level("INFO"):
        cfg = compose_config(FAST + RUN + ["trainer.max_epochs=1", f"resume={tmp_path}/run/checkpoints/last.pt"])
        metrics = Trainer(cfg, tmp_path / "again").fit()
    assert metrics["epoch"] == 1
    assert "has trained 1 epochs and trainer.max_epochs=1: nothing is left to train" in caplog.text


def test_best_is_a_hard_link_to_the_last_checkpoint_it_equals(tmp_path):
    trainer = Trainer(compose_config(RUN + ["trainer.max_epochs=1"]), tmp_path / "run")
    trainer.fit()  # the first epoch always improves on nothing
    last, best = tmp_path / "run/checkpoints/last.pt", tmp_path / "run/checkpoints/best.pt"
    assert last.stat().st_ino == best.stat().st_ino
    saved = best.read_bytes()
    # A later epoch that is not the best: last.pt is replaced by a new file, best.pt keeps its bytes.
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    trainer.epoch, trainer.step = 2, 99
    trainer.save("last.pt")
    assert last.stat().st_ino != best.stat().st_ino and best.read_bytes() == saved
    assert (read_checkpoint(best)["step"], read_checkpoint(last)["step"]) == (6, 99)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]


def test_best_is_a_copy_where_links_fail(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint({"step": 3}, last)
    best.write_bytes(b"old")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_io.os, "link", no_links)
    ckpt_io.link_checkpoint(last, best)
    assert best.read_bytes() == last.read_bytes() and best.stat().st_ino != last.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    monkeypatch.setattr(ckpt_io.shutil, "copyfileobj", lambda src, dst: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {best}: No space left on device; "
                                              f"the previous checkpoint there is intact"):
        ckpt_io.link_checkpoint(last, best)
    assert best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_summary_speed_counts_only_what_this_process_trained(tmp_path, monkeypatch):
    """A checkpoint taken between training and validation (a SIGTERM there) resumes with that epoch
    trained: the summary's images/s is the resumed process's own epochs, and the epoch's record keeps
    the training metrics of the process that trained it."""
    first = Trainer(compose_config(RUN + ["trainer.max_epochs=3"]), tmp_path / "run")
    trained = []
    train_one_epoch = first.train_one_epoch

    def then_sigterm():
        trained.append(train_one_epoch())
        if first.epoch == 1:
            first.stop_signal = signal.SIGTERM
        return trained[-1]

    monkeypatch.setattr(first, "train_one_epoch", then_sigterm)
    with pytest.raises(Exception, match="stopped by SIGTERM at epoch 2"):
        first.fit()
    last = tmp_path / "run/checkpoints/last.pt"
    assert (read_checkpoint(last)["epoch"], read_checkpoint(last)["batch_in_epoch"]) == (1, 6)

    resumed = Trainer(compose_config(RUN + ["trainer.max_epochs=3", f"resume={last}"]), tmp_path / "again")
    speeds, records = [], []
    monkeypatch.setattr(resumed, "summarize", speeds.append)
    record_epoch = resumed.record_epoch
    monkeypatch.setattr(resumed, "record_epoch", lambda train, *rest: (records.append(train),
                                                                        record_epoch(train, *rest))[1])
    resumed.fit()
    assert records[0] == trained[1]  # epoch 2, trained before the stop
    assert records[1]["images_per_s"] > 0 and records[1] != trained[1]
    assert speeds == [pytest.approx(records[1]["images_per_s"])]  # epoch 3 alone


def test_a_ddp_step_makes_one_collective_which_also_carries_the_stop(tmp_path, monkeypatch):
    """Under DDP (faked: 2 ranks, this one rank 0) a training step makes one all-reduce: keep_batch's,
    which carries the stop flags too; the epoch adds one for its totals."""
    from rednet.engine import distributed

    trainer = Trainer(compose_config(RUN + ["trainer.limit_train_batches=3"]), tmp_path / "run")
    trainer.dist = distributed.DistInfo(rank=0, world_size=2)
    calls, other_rank_stops_at = [], []

    def all_reduce(tensor, op=None):
        calls.append(tensor.numel())
        if tensor.numel() == 3 and len(calls) in other_rank_stops_at:
            tensor[2] += 1  # rank 1 got a SIGTERM

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    for name in ("broadcast", "barrier", "all_gather_object", "broadcast_object_list", "all_gather"):
        monkeypatch.setattr(distributed.dist, name, lambda *a, _name=name, **k: calls.append(_name))
    trainer.train_one_epoch()
    assert calls == [3] * trainer.steps_per_epoch + [3]  # one per step, and the epoch's totals

    class Stopped(Exception):
        pass

    monkeypatch.setattr(trainer, "stop", lambda: (_ for _ in ()).throw(Stopped()))
    calls.clear()
    other_rank_stops_at.append(2)
    trainer.epoch, trainer.batch_in_epoch, step = 1, 0, trainer.step
    with pytest.raises(Stopped):
        trainer.train_one_epoch()
    assert (trainer.step - step, len(calls), trainer.stop_signal) == (2, 2, signal.SIGTERM)
