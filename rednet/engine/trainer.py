"""The training loop: ``Trainer(cfg, run_dir).fit()``.

Read it top to bottom: ``__init__`` builds everything from the config, ``fit`` runs the epochs,
``train_one_epoch`` runs the steps and returns their metrics, ``validate`` measures and returns
its results, and the records end each epoch. Each step is batch -> autocast forward -> loss ->
scaled backward -> (clip) -> optimizer step -> scheduler step -> EMA update. Checkpoints, resume
and signals are :class:`rednet.engine.checkpointing.Checkpoints`, which the trainer is.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rednet.commands import command_line
from rednet.data import build_datamodule
from rednet.engine import distributed
from rednet.engine.checkpointing import Checkpoints, Interrupted, set_rng_state
from rednet.engine.context import setup_run
from rednet.engine.ema import ModelEma
from rednet.engine.evaluate import EvalResult, evaluate
from rednet.engine.feed import DeviceFeed
from rednet.engine.optim import build_optimizer, build_scheduler
from rednet.engine.precision import autocast, make_scaler
from rednet.errors import CheckpointError, ConfigError, UserError
from rednet.io import write_json
from rednet.metrics import topk_correct
from rednet.models import build_model
from rednet.viz.confusion import confusion_figure
from rednet.viz.kernels import log_kernel_heatmaps

log = logging.getLogger("rednet")


class NonFiniteLossError(UserError):
    pass


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Trainer(Checkpoints):
    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.started = time.perf_counter()
        self.cfg = cfg
        t = cfg.trainer
        ctx = self.ctx = setup_run(cfg, run_dir)
        self.device, self.dist, self.run_dir = ctx.device, ctx.dist, ctx.run_dir
        self.batch_per_rank, self.dtype = ctx.batch_per_rank, ctx.dtype
        self.channels_last, self.compile = ctx.channels_last, ctx.compile
        seed_everything(t.seed + self.dist.rank, t.deterministic)

        self.log(f"run folder {self.run_dir}; building data={cfg.data.name}")
        with distributed.main_first(self.dist):  # one download, not one per rank
            self.data = build_datamodule(cfg.data)
        self.class_names = list(self.data.class_names)
        self.train_loader = self.data.train_loader(self.batch_per_rank, self.dist.rank, self.dist.world_size, t.seed)
        self.val_loader = self.data.val_loader(self.batch_per_rank, self.dist.rank, self.dist.world_size)
        # uint8 batches from the loaders, normalised on the device
        self.train_batches, self.val_batches = (
            DeviceFeed(loader, self.device, self.data.mean, self.data.std, channels_last=self.channels_last,
                       name=f"data={cfg.data.name}") for loader in (self.train_loader, self.val_loader))
        self.steps_per_epoch = len(self.train_loader)
        if t.limit_train_batches is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, t.limit_train_batches)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(self.data.train_set)} "
                              f"training images, so an epoch has no full batch; lower data.batch_size")

        # The model as the checkpoint stores it: no compile, no DDP wrapper.
        self.log(f"building model={cfg.model.name}")
        self.model = build_model(cfg.model, self.data.num_classes, self.data.in_chans, self.data.image_size)
        if self.dist.enabled and t.sync_batchnorm:  # before the DDP wrap, which then syncs the statistics
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, t.ema_decay) if t.ema else None
        # dynamic=False: see scripts/bench_models.py; input shapes are fixed within a run anyway.
        self.train_model = torch.compile(self.model, dynamic=False) if self.compile else self.model
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.optimizer = build_optimizer(cfg.optim, self.model, cfg.data.batch_size)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, self.steps_per_epoch, t.max_epochs)
        self.scaler = make_scaler(self.device, self.dtype)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0  # steps done in the current epoch (mid-epoch checkpoints)
        self.step = 0
        self.bad_steps = 0
        self.best_acc1 = -1.0
        self.best_epoch = -1
        self.metrics: dict = {}
        self.epoch_train: dict | None = None  # the current epoch's training metrics, once it is trained
        self.stop_signal: int | None = None
        self.stopping_ranks = 0.0  # ranks with a stop signal, as this step's keep_batch counted them
        self.writer: SummaryWriter | None = None  # made once training starts: a failed start leaves no event file
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.saved: tuple[Path, int, int, int] | None = None  # the newest last.pt: (path, epoch, batch, step)
        self.resumed_from: Path | None = None
        self.pending_rng: dict | None = None
        path = self.checkpoint_to_resume()
        if path is not None:
            self.resume(path)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        t = self.cfg.trainer
        if self.dist.is_main:
            self.writer = SummaryWriter(self.run_dir / "tensorboard")
        trained_images = train_time = 0.0
        # Signals are caught before the line that says training starts: from then on Ctrl-C saves.
        with self.stop_on_signals(), distributed.lost_process_errors(self.dist, self.ckpt_dir / "last.pt"):
            self.log(f"{self.cfg.model.name}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                     f"{self.data.num_classes} classes, {len(self.data.train_set)} train / {len(self.data.val_set)} "
                     f"val images, device {self.device}, precision {self.dtype or torch.float32}, channels_last "
                     f"{self.channels_last}, compile {self.compile}, "
                     f"{self.dist.world_size} process(es)")  # the run folder was logged at start-up
            while self.epoch < t.max_epochs:
                # After a checkpoint taken between training and validation this epoch is trained already.
                trains = self.batch_in_epoch < self.steps_per_epoch
                train = self.epoch_train = self.train_one_epoch()
                if self.stop_requested():  # validation can take minutes: save the epoch first
                    self.stop()
                val, val_ema = self.validate()
                if trains:  # the summary's speed is this process's own
                    trained_images += train["images_per_s"] * train["epoch_time_s"]
                    train_time += train["epoch_time_s"]
                self.epoch += 1
                self.batch_in_epoch = 0
                is_best = val.acc1 > self.best_acc1
                if is_best:
                    self.best_acc1, self.best_epoch = val.acc1, self.epoch
                self.record_epoch(train, val, val_ema)
                self.epoch_train = None
                self.save("last.pt")
                if is_best:
                    self.save_best()
                if self.epoch < t.max_epochs and self.stop_requested():
                    raise Interrupted(f"stopped by {signal.Signals(self.stop_signal).name} after epoch {self.epoch}; "
                                      f"saved {self.ckpt_dir / 'last.pt'}; {self.resume_hint()}", self.stop_signal)
            if self.resumed_from is not None and self.epoch >= t.max_epochs and "val" not in self.metrics:
                raise CheckpointError(f"{self.resumed_from} has no validation metrics to report")
            self.write_metrics()
            if self.writer:
                self.writer.close()
            self.summarize(trained_images / train_time if train_time else None)
        return self.metrics

    def train_one_epoch(self) -> dict:
        t = self.cfg.trainer
        self.train_model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        # After a mid-epoch checkpoint the sampler starts where the run stopped; its order depends
        # only on (seed, epoch). The generators are restored once the loader has drawn its seed,
        # so the augmentations continue as in an uninterrupted run (exactly so with num_workers=0).
        self.train_loader.sampler.skip_next(self.batch_in_epoch * self.batch_per_rank)
        batches = iter(self.train_batches)
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = seen = 0
        # A checkpoint taken between training and validation resumes with nothing left to train.
        nothing_left = self.batch_in_epoch >= self.steps_per_epoch
        start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{t.max_epochs}",
                   disable=not self.show_progress, dynamic_ncols=True, leave=False)
        while self.batch_in_epoch < self.steps_per_epoch:
            images, target = next(batches)
            with autocast(self.device, self.dtype):
                logits = self.train_model(images)
                loss = self.criterion(logits.float(), target)
            if not self.keep_batch(loss, target.numel()):
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            self.batch_in_epoch += 1

            loss_sum += loss.detach() * target.numel()
            correct += topk_correct(logits.detach(), target, (1,))[0]
            seen += target.numel()
            bar.update()
            if self.step % 10 == 0 or self.batch_in_epoch == self.steps_per_epoch:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{correct / seen:.3f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                img_s=f"{seen * self.dist.world_size / elapsed:.0f}")
                if self.writer:
                    self.writer.add_scalar("train/loss", float(loss.detach()), self.step)
                    self.writer.add_scalar("train/acc1", correct / seen, self.step)
                    self.writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], self.step)
            if t.save_every_n_steps and self.step % t.save_every_n_steps == 0 and \
                    self.batch_in_epoch < self.steps_per_epoch:
                self.save("last.pt")
            if self.stop_requested(self.stopping_ranks):
                self.stop()
        bar.close()
        if nothing_left:  # the metrics of the process that trained it, which its checkpoint holds
            return self.epoch_train or {"loss": None, "acc1": None, "images_per_s": 0.0, "epoch_time_s": 0.0}
        elapsed = time.perf_counter() - start
        if seen == 0:  # every batch was skipped (non-finite losses, unreadable images)
            return {"loss": None, "acc1": None, "images_per_s": 0.0, "epoch_time_s": elapsed}
        totals = torch.tensor([float(loss_sum), correct, seen], dtype=torch.float64, device=self.device)
        totals = distributed.all_reduce_sum(totals, self.dist).cpu()
        return {"loss": float(totals[0] / totals[2]), "acc1": float(totals[1] / totals[2]),
                "images_per_s": float(totals[2]) / elapsed, "epoch_time_s": elapsed}

    def keep_batch(self, loss: torch.Tensor, batch_size: int) -> bool:
        """Whether this batch makes an optimizer step.

        A batch in which no image could be read (``data.bad_images=skip``) is skipped with a
        warning. A NaN/inf loss skips up to ``trainer.max_bad_steps`` batches, then stops the run.
        The flags are summed over ranks, so every rank takes the same decision: DDP never waits on
        a rank that skipped. The stop flag rides on the same reduction (``stopping_ranks``), so that
        the end of the step asks no collective of its own.
        """
        empty = batch_size == 0
        flags = torch.tensor([float(empty), 0.0 if empty or math.isfinite(float(loss.detach())) else 1.0,
                              0.0 if self.stop_signal is None else 1.0], device=self.device)
        empty_ranks, bad, self.stopping_ranks = distributed.all_reduce_sum(flags, self.dist).tolist()
        if empty_ranks:
            # The mean loss of no sample is NaN; that is not the model diverging.
            self.log(f"warning: no readable image in batch {self.batch_in_epoch + 1} of epoch {self.epoch + 1}"
                     f"{' on ' + str(int(empty_ranks)) + ' rank(s)' if self.dist.world_size > 1 else ''}; "
                     f"batch skipped")
            self.batch_in_epoch += 1
            return False
        if bad == 0:
            return True
        self.bad_steps += 1
        if self.bad_steps > self.cfg.trainer.max_bad_steps:
            last = self.ckpt_dir / "last.pt"
            good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss is {float(loss.detach())} at step {self.step + 1} (epoch {self.epoch + 1}); {good}; "
                f"lower optim.lr, "
                f"set trainer.grad_clip, or skip bad batches with trainer.max_bad_steps=N")
        self.log(f"warning: non-finite loss in batch {self.batch_in_epoch + 1} of epoch {self.epoch + 1}, "
                 f"batch skipped ({self.bad_steps}/{self.cfg.trainer.max_bad_steps})")
        self.batch_in_epoch += 1
        return False

    def validate(self) -> tuple[EvalResult, EvalResult | None]:
        """The model's results on the validation set and, with ``trainer.ema``, its EMA's."""
        t = self.cfg.trainer
        # Each rank updated its BN statistics with its own last batch; validate rank 0's, which
        # is what the checkpoint holds, so a single-process eval of it gives the same numbers.
        distributed.broadcast_buffers(self.model, self.dist)
        result = evaluate(self.model, self.val_batches, self.device, self.dtype, self.class_names, self.dist,
                          t.limit_val_batches, self.show_progress)
        if self.ema is None:
            return result, None
        distributed.broadcast_buffers(self.ema, self.dist)
        return result, evaluate(self.ema.module, self.val_batches, self.device, self.dtype, self.class_names,
                                self.dist, t.limit_val_batches, self.show_progress, "val ema")

    # -- records ------------------------------------------------------------------------------

    def record_epoch(self, train: dict, val: EvalResult, val_ema: EvalResult | None) -> None:
        self.metrics = {"epoch": self.epoch, "step": self.step, "train": train, "val": val.as_dict(),
                        "best": {"acc1": self.best_acc1, "epoch": self.best_epoch}}
        ema = ""
        if val_ema is not None:
            self.metrics["val_ema"] = val_ema.as_dict()
            ema = f" | ema acc1 {val_ema.acc1:.4f}"
        trained = (f"train loss {train['loss']:.4f} acc1 {train['acc1']:.4f} ({train['images_per_s']:.0f} img/s)"
                   if train["loss"] is not None else "train: every batch skipped")
        self.log(f"epoch {self.epoch}/{self.cfg.trainer.max_epochs}: {trained} | val loss {val.loss:.4f} "
                 f"acc1 {val.acc1:.4f} acc5 {val.acc5:.4f}{ema}")
        if self.writer:
            w = self.writer
            for key in ("loss", "acc1", "acc5"):
                w.add_scalar(f"val/{key}", getattr(val, key), self.epoch)
                if val_ema is not None:
                    w.add_scalar(f"val_ema/{key}", getattr(val_ema, key), self.epoch)
            w.add_scalar("perf/images_per_s", train["images_per_s"], self.epoch)
            w.add_scalar("perf/epoch_time_s", train["epoch_time_s"], self.epoch)
            w.add_figure("val/confusion_matrix", confusion_figure(val.confusion), self.epoch, close=True)
            if self.cfg.trainer.log_kernels:
                log_kernel_heatmaps(w, self.model, self.data, self.cfg.data, self.epoch)
            w.flush()

    def write_metrics(self) -> None:
        if not self.dist.is_main:
            return
        write_json(self.run_dir / "metrics.json", self.metrics)
        if self.writer and "val" in self.metrics:
            hparams = {"model": self.cfg.model.name, "data": self.cfg.data.name, "optim": self.cfg.optim.name,
                       "lr": self.optimizer.param_groups[0]["initial_lr"], "batch_size": self.cfg.data.batch_size,
                       "epochs": self.cfg.trainer.max_epochs, "precision": self.cfg.trainer.precision}
            self.writer.add_hparams(hparams, {"hparam/val_acc1": self.metrics["val"]["acc1"],
                                              "hparam/best_acc1": self.metrics["best"]["acc1"]}, run_name="hparams")

    def summarize(self, images_per_s: float | None) -> None:
        """The run's last lines: how it ended, and where its results are."""
        if "val" not in self.metrics:
            return
        def show(path: Path) -> str:  # relative to where the user is, when it is below it
            relative = os.path.relpath(path)
            return path.as_posix() if relative.startswith("..") else relative

        minutes, seconds = divmod(round(time.perf_counter() - self.started), 60)
        speed = f", {images_per_s:.0f} train img/s" if images_per_s else ""
        val, best = self.metrics["val"], self.metrics["best"]
        self.log(f"finished {self.epoch} epochs in {minutes}m{seconds:02d}s{speed}: "
                 f"best top-1 {100 * best['acc1']:.2f}% "
                 f"at epoch {best['epoch']}, final top-1 {100 * val['acc1']:.2f}% (top-5 {100 * val['acc5']:.2f}%)")
        candidates = (self.ckpt_dir / "best.pt", self.resumed_from and self.resumed_from.parent / "best.pt")
        best_pt = next((p for p in candidates if p and p.is_file()), None)
        if best_pt is not None:
            self.log(f"  best checkpoint  {show(best_pt)}")
        self.log(f"  metrics          {show(self.run_dir / 'metrics.json')}")
        self.log(f"  TensorBoard      tensorboard --logdir {show(self.run_dir / 'tensorboard')}")
        if best_pt is not None:
            self.log(f"  evaluate it      {command_line('eval.py', ckpt=show(best_pt))}")

    def log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    @property
    def show_progress(self) -> bool:
        mode = self.cfg.trainer.progress
        return self.dist.is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
