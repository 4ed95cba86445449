"""The training loop: ``Trainer(cfg, run_dir).fit()``.

Read it top to bottom: ``__init__`` builds everything from the config, ``fit`` runs the epochs,
``train_one_epoch`` runs the steps, ``validate`` measures, ``save`` and ``resume`` keep the run
safe. Each step is batch -> autocast forward -> loss -> scaled backward -> (clip) -> optimizer
step -> scheduler step -> EMA update.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rednet.data import build_datamodule
from rednet.engine import distributed
from rednet.engine.checkpoint import read_checkpoint, save_checkpoint
from rednet.engine.ema import ModelEma
from rednet.engine.evaluate import EvalResult, check_class_names, evaluate
from rednet.engine.optim import build_optimizer, build_scheduler
from rednet.engine.precision import autocast, make_scaler, resolve_auto, resolve_device, resolve_precision
from rednet.errors import CheckpointError, ConfigError, UserError
from rednet.metrics import to_json, topk_correct
from rednet.models import build_model, load_weights

log = logging.getLogger("rednet")


class NonFiniteLossError(UserError):
    pass


class Interrupted(UserError):
    """SIGTERM or SIGINT arrived; the run saved its state and stops with the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Every random generator the run uses, in types that load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_last_checkpoint(cfg: DictConfig, roots=("outputs", "multirun")) -> Path:
    """The newest ``checkpoints/last.pt`` of a run with the same model and data.

    A run's ``.hydra/config.yaml`` says what it trained; a run without one (``hydra.output_subdir=null``)
    is asked through the config inside its checkpoint, newest first, which means reading it.
    """
    def same_run(other) -> bool:
        return OmegaConf.select(other, "model.name") == cfg.model.name and \
            OmegaConf.select(other, "data.name") == cfg.data.name

    paths = sorted((p for root in roots for p in Path(root).glob("**/checkpoints/last.pt")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        saved = path.parent.parent / ".hydra" / "config.yaml"
        if saved.is_file():
            if same_run(OmegaConf.load(saved)):
                return path
            continue
        try:
            if same_run(OmegaConf.create(read_checkpoint(path).get("config") or {})):
                return path
        except CheckpointError:
            continue  # a damaged file is not a run to resume
    raise CheckpointError(f"resume=auto found no checkpoints/last.pt of model={cfg.model.name} "
                          f"data={cfg.data.name} under {' or '.join(roots)}/; start without resume, "
                          f"or pass resume=path/to/last.pt")


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.started = time.perf_counter()
        self.cfg = cfg
        t = cfg.trainer
        self.device = resolve_device(t.device, distributed.env_info().local_rank)
        if t.strategy == "ddp" and t.sync_batchnorm and self.device.type != "cuda":
            # PyTorch's SyncBatchNorm raises in its first training forward on any other device.
            raise ConfigError(f"trainer.sync_batchnorm=true needs CUDA: PyTorch's SyncBatchNorm does not run on "
                              f"the {self.device.type}; set trainer.sync_batchnorm=false")
        self.dist = (distributed.init_distributed(self.device, t.ddp_timeout_s) if t.strategy == "ddp"
                     else distributed.DistInfo())
        # Every rank resolved ${now:...} by itself; rank 0's folder is the run's.
        self.run_dir = Path(distributed.broadcast_object(str(run_dir), self.dist))
        if self.dist.enabled and (warning := distributed.shared_store_warning()):
            self.log(warning)
        if cfg.data.batch_size % self.dist.world_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide across "
                              f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}")
        self.batch_per_rank = cfg.data.batch_size // self.dist.world_size
        self.dtype = resolve_precision(t.precision, self.device)
        self.channels_last = resolve_auto("channels_last", t.channels_last, self.device)
        self.compile = resolve_auto("compile", t.compile, self.device)
        seed_everything(t.seed + self.dist.rank, t.deterministic)

        self.log(f"run folder {self.run_dir}; building data={cfg.data.name}")
        with distributed.main_first(self.dist):  # one download, not one per rank
            self.data = build_datamodule(cfg.data)
        self.class_names = list(self.data.class_names)
        self.train_loader = self.data.train_loader(self.batch_per_rank, self.dist.rank, self.dist.world_size, t.seed)
        self.val_loader = self.data.val_loader(self.batch_per_rank, self.dist.rank, self.dist.world_size)
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
        self.stop_signal: int | None = None
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
                train = self.train_one_epoch()
                if self.stop_requested():  # validation can take minutes: save the epoch first
                    self.stop()
                val = self.validate()
                trained_images += train["images_per_s"] * train["epoch_time_s"]
                train_time += train["epoch_time_s"]
                self.epoch += 1
                self.batch_in_epoch = 0
                is_best = val.acc1 > self.best_acc1
                if is_best:
                    self.best_acc1, self.best_epoch = val.acc1, self.epoch
                self.record_epoch(train, val)
                self.save("last.pt")
                if is_best:
                    self.save("best.pt")
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
        batches = iter(self.train_loader)
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
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = target.to(self.device, non_blocking=True)
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
            if self.stop_requested():
                self.stop()
        bar.close()
        if nothing_left:
            return self.metrics.get("train", {"loss": None, "acc1": None, "images_per_s": 0.0, "epoch_time_s": 0.0})
        elapsed = time.perf_counter() - start
        if seen == 0:  # every batch was skipped (non-finite losses, unreadable images)
            return {"loss": None, "acc1": None, "images_per_s": 0.0, "epoch_time_s": elapsed}
        totals = torch.tensor([float(loss_sum), correct, seen], dtype=torch.float64, device=self.device)
        totals = distributed.all_reduce_sum(totals, self.dist).cpu()
        return {"loss": float(totals[0] / totals[2]), "acc1": float(totals[1] / totals[2]),
                "images_per_s": float(totals[2]) / elapsed, "epoch_time_s": elapsed}

    def stop(self) -> None:
        """Saves where the run is and ends it, after a SIGTERM or SIGINT."""
        self.save("last.pt")
        name = signal.Signals(self.stop_signal).name
        raise Interrupted(f"stopped by {name} at epoch {self.epoch + 1}, step {self.step}; saved "
                          f"{self.ckpt_dir / 'last.pt'}; {self.resume_hint()}", self.stop_signal)

    def stop_requested(self) -> bool:
        """Whether a SIGTERM or SIGINT reached this process or, under DDP, any other.

        Asked of every rank at the same points, so that all stop after the same step: a rank
        that stopped alone would leave the others waiting in their next collective.
        """
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor([0.0 if self.stop_signal is None else 1.0], device=self.device)
        if not distributed.all_reduce_sum(flag, self.dist).item():
            return False
        if self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return True

    def resume_hint(self) -> str:
        if self.cfg.resume == "if_exists":
            return "run the same command again to continue (resume=if_exists)"
        return f"continue with resume=auto (or resume={self.ckpt_dir / 'last.pt'})"

    def keep_batch(self, loss: torch.Tensor, batch_size: int) -> bool:
        """Whether this batch makes an optimizer step.

        A batch in which no image could be read (``data.bad_images=skip``) is skipped with a
        warning. A NaN/inf loss skips up to ``trainer.max_bad_steps`` batches, then stops the run.
        The flags are summed over ranks, so every rank takes the same decision: DDP never waits on
        a rank that skipped.
        """
        empty = batch_size == 0
        flags = torch.tensor([float(empty), 0.0 if empty or math.isfinite(float(loss.detach())) else 1.0],
                             device=self.device)
        empty_ranks, bad = distributed.all_reduce_sum(flags, self.dist).tolist()
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

    def validate(self) -> EvalResult:
        t = self.cfg.trainer
        # Each rank updated its BN statistics with its own last batch; validate rank 0's, which
        # is what the checkpoint holds, so a single-process eval of it gives the same numbers.
        distributed.broadcast_buffers(self.model, self.dist)
        if self.ema is not None:
            distributed.broadcast_buffers(self.ema, self.dist)
        result = evaluate(self.model, self.val_loader, self.device, self.dtype, self.class_names, self.dist,
                          self.channels_last, t.limit_val_batches, self.show_progress)
        self.last_confusion = result.confusion
        if self.ema is not None:
            self.ema_result = evaluate(self.ema.module, self.val_loader, self.device, self.dtype, self.class_names,
                                       self.dist, self.channels_last, t.limit_val_batches, self.show_progress,
                                       "val ema")
        return result

    # -- records ------------------------------------------------------------------------------

    def record_epoch(self, train: dict, val: EvalResult) -> None:
        self.metrics = {"epoch": self.epoch, "step": self.step, "train": train, "val": val.as_dict(),
                        "best": {"acc1": self.best_acc1, "epoch": self.best_epoch}}
        ema = ""
        if self.ema is not None:
            self.metrics["val_ema"] = self.ema_result.as_dict()
            ema = f" | ema acc1 {self.ema_result.acc1:.4f}"
        trained = (f"train loss {train['loss']:.4f} acc1 {train['acc1']:.4f} ({train['images_per_s']:.0f} img/s)"
                   if train["loss"] is not None else "train: every batch skipped")
        self.log(f"epoch {self.epoch}/{self.cfg.trainer.max_epochs}: {trained} | val loss {val.loss:.4f} "
                 f"acc1 {val.acc1:.4f} acc5 {val.acc5:.4f}{ema}")
        if self.writer:
            w = self.writer
            for key in ("loss", "acc1", "acc5"):
                w.add_scalar(f"val/{key}", getattr(val, key), self.epoch)
                if self.ema is not None:
                    w.add_scalar(f"val_ema/{key}", getattr(self.ema_result, key), self.epoch)
            w.add_scalar("perf/images_per_s", train["images_per_s"], self.epoch)
            w.add_scalar("perf/epoch_time_s", train["epoch_time_s"], self.epoch)
            fig = val.confusion.figure()
            w.add_figure("val/confusion_matrix", fig, self.epoch, close=True)
            if self.cfg.trainer.log_kernels:
                from rednet.viz import log_kernel_heatmaps

                log_kernel_heatmaps(w, self.model, self.data, self.cfg.data, self.epoch)
            w.flush()

    def write_metrics(self) -> None:
        if not self.dist.is_main:
            return
        tmp = self.run_dir / ".metrics.json.tmp"
        tmp.write_text(to_json(self.metrics))
        tmp.replace(self.run_dir / "metrics.json")
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
            self.log(f"  evaluate it      python eval.py ckpt={show(best_pt)}")

    def log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    @property
    def show_progress(self) -> bool:
        mode = self.cfg.trainer.progress
        return self.dist.is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self, rng_by_rank: list[dict]) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "bad_steps": self.bad_steps,
            "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch,
            "rng": rng_by_rank[0],
            # Under DDP every rank draws its own augmentations: each one's generators, by rank.
            "rng_by_rank": rng_by_rank if self.dist.enabled else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "metrics": self.metrics,
            "class_names": self.class_names,
        }

    def save(self, name: str) -> None:
        """Only rank 0 writes; every rank waits so that no rank races ahead of a checkpoint.
        ``last.pt`` keeps its predecessor as ``last.prev.pt``; ``best.pt`` needs no second copy."""
        rng_by_rank = distributed.all_gather_object(rng_state(), self.dist)
        if self.dist.is_main:
            save_checkpoint(self.state(rng_by_rank), self.ckpt_dir / name, keep_previous=name == "last.pt")
        if name == "last.pt":
            self.saved = (self.ckpt_dir / name, self.epoch, self.batch_in_epoch, self.step)
        distributed.barrier(self.dist)

    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint that ``resume`` names, or None for a fresh start.

        ``auto``: the newest ``last.pt`` of the same model and data under outputs/ (an error if
        none). ``if_exists``: this run folder's own ``last.pt`` if it has one, so that one command
        starts a run and continues it after any restart (torchrun ``--max-restarts``, a SLURM
        requeue) as long as the run folder is fixed. Rank 0 decides, so every rank loads the same file.
        """
        mode = self.cfg.resume
        choice = error = None
        if self.dist.is_main:
            try:
                if mode == "auto":
                    choice = find_last_checkpoint(self.cfg)
                elif mode == "if_exists":
                    last = self.ckpt_dir / "last.pt"
                    choice = last if last.is_file() else None
                    if choice is None:
                        self.log(f"resume=if_exists: {self.run_dir} has no checkpoints/last.pt yet, starting the run")
                elif mode:
                    choice = Path(mode)
            except CheckpointError as e:
                error = str(e)
        choice, error = distributed.broadcast_object((choice, error), self.dist)
        if error is not None:
            raise CheckpointError(error)
        if mode is None and distributed.restart_count():
            self.log(f"warning: torchrun restarted this run (restart {distributed.restart_count()}) and without resume "
                     f"training starts over; add resume=if_exists and a fixed hydra.run.dir to continue instead")
        return choice

    def resume(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} cannot resume training: it lacks {', '.join(missing)} "
                                  f"(weights-only files go in model.pretrained=...)")
        trained = ckpt.get("config") or {}
        for group in ("model", "optim"):
            name = (trained.get(group) or {}).get("name")
            if name is not None and name != self.cfg[group].name:
                raise CheckpointError(f"{path} was trained with {group}={name}, not {group}={self.cfg[group].name}; "
                                      f"resume with {group}={name}, or start a new run")
        check_class_names(ckpt.get("class_names"), self.class_names, str(path), f"data={self.cfg.data.name}")
        load_weights(self.model, ckpt["model"], name=str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit optim={self.cfg.optim.name} ({e!r}); "
                                  f"resume with the optim settings it was trained with") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # The optimizer state holds the lr of the schedule it was saved under; with a longer
        # trainer.max_epochs the schedule is stretched, so the next step's lr is recomputed from it.
        schedule = zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas)
        for group, base_lr, factor in schedule:
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batch_in_epoch = ckpt.get("batch_in_epoch", 0)
        self.bad_steps = ckpt.get("bad_steps", 0)
        self.best_acc1, self.best_epoch = ckpt.get("best_acc1", -1.0), ckpt.get("best_epoch", -1)
        self.metrics = dict(ckpt.get("metrics") or {})
        # Each rank continues its own generators when the run had as many processes; the data
        # order depends on the process count too, so with another count nothing can be exact.
        saved = ckpt.get("rng_by_rank") or [ckpt["rng"]]
        mine = saved[self.dist.rank] if len(saved) == self.dist.world_size else saved[0] if self.dist.is_main else None
        if mine is not None:
            set_rng_state(mine)
            self.pending_rng = mine if self.batch_in_epoch else None
        if len(saved) != self.dist.world_size:
            self.log(f"warning: {path} holds the random state of {len(saved)} process(es) and this run has "
                     f"{self.dist.world_size}: data order and augmentations differ from an uninterrupted run's")
        self.resumed_from = path
        self.saved = (path, self.epoch, self.batch_in_epoch, self.step)
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")
        if self.epoch >= self.cfg.trainer.max_epochs:
            self.log(f"warning: {path} has trained {self.epoch} epochs and trainer.max_epochs="
                     f"{self.cfg.trainer.max_epochs}: nothing is left to train, its metrics are reported as they are; "
                     f"raise trainer.max_epochs to train on")

    def unsaved(self, signum: int) -> str:
        """What a second signal leaves behind: the newest checkpoint, and the steps after it."""
        name, at = signal.Signals(signum).name, f"at step {self.step} (epoch {self.epoch + 1})"
        if self.saved is None:
            return f"stopped at once by a second {name} {at}, before the first checkpoint: nothing was saved"
        path, epoch, batch, step = self.saved
        held = f"after epoch {epoch}" if batch == 0 else f"in epoch {epoch + 1}"
        since = f"the {self.step - step} step(s) since" if self.step > step else "nothing, it is up to date"
        return (f"stopped at once by a second {name} {at}; saved: {path} (step {step}, {held}); not saved: {since}; "
                f"continue from it with resume=auto")

    @contextmanager
    def stop_on_signals(self):
        """SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current step, save, and stop. A second
        one stops at once, saying what the last checkpoint holds."""
        second: list[Interrupted] = []

        def request_stop(signum, frame):
            if self.stop_signal is not None:  # the user insists
                # KeyboardInterrupt, which no library's `except Exception` swallows; it becomes one line below.
                second.append(Interrupted(self.unsaved(signum), signum))
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.dist.is_main:  # os.write: print() is not safe inside a signal handler
                os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name}: finishing this step, then saving "
                         f"{self.ckpt_dir / 'last.pt'}; press Ctrl-C again to stop at once without saving\n".encode())

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        except KeyboardInterrupt:
            if second:
                raise second[0] from None
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
