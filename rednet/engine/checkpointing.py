"""Keeping a training run safe: what a checkpoint holds, writing it, resuming from it, and stopping
on SIGTERM or Ctrl-C with the run saved.

:class:`Checkpoints` is the part of :class:`rednet.engine.trainer.Trainer` that does this; the
trainer's own module is the loop. A checkpoint carries everything needed to resume exactly or to
evaluate with no other file: the model, optimizer, scheduler, scaler and EMA, the epoch and step,
every process's random generators, the resolved config, the metrics and the class names.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rednet.commands import override
from rednet.engine import distributed
from rednet.engine.trained import check_class_names
from rednet.errors import CheckpointError, UserError
from rednet.io import link_checkpoint, read_checkpoint, save_checkpoint
from rednet.models import load_weights


class Interrupted(UserError):
    """SIGTERM or SIGINT arrived; the run saved its state and stops with the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


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


class Checkpoints:
    """The trainer's checkpoints, resume and signals. It reads and writes the trainer's state:
    ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``ema``, ``epoch``, ``batch_in_epoch``,
    ``step``, ``bad_steps``, ``best_acc1``, ``best_epoch``, ``metrics``, ``epoch_train``, ``class_names``."""

    cfg: DictConfig
    dist: distributed.DistInfo
    ckpt_dir: Path
    steps_per_epoch: int
    stop_signal: int | None
    saved: tuple[Path, int, int, int] | None  # the newest last.pt: (path, epoch, batch, step)
    resumed_from: Path | None
    pending_rng: dict | None
    epoch_train: dict | None  # the current epoch's training metrics, once it is trained

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
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            "metrics": self.metrics,
            "epoch_train": self.epoch_train,
            "class_names": self.class_names,
        }

    def save(self, name: str) -> None:
        """Only rank 0 writes; every rank waits so that no rank races ahead of a checkpoint.
        ``last.pt`` keeps its predecessor as ``last.prev.pt``."""
        rng_by_rank = distributed.all_gather_object(rng_state(), self.dist)
        if self.dist.is_main:
            save_checkpoint(self.state(rng_by_rank), self.ckpt_dir / name, keep_previous=name == "last.pt")
        if name == "last.pt":
            self.saved = (self.ckpt_dir / name, self.epoch, self.batch_in_epoch, self.step)
        distributed.barrier(self.dist)

    def save_best(self) -> None:
        """``best.pt`` after :meth:`save` wrote ``last.pt`` with the same state: a hard link to it, not a
        second serialisation. Replacing ``last.pt`` later makes a new file and leaves ``best.pt`` be."""
        if self.dist.is_main:
            link_checkpoint(self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt")

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
        self.check_warmup(path, (trained.get("sched") or {}).get("warmup_iters"), ckpt["step"])
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
        self.epoch_train = ckpt.get("epoch_train")
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

    def check_warmup(self, path: Path, warmup_iters: int | None, step: int) -> None:
        """A checkpoint from before the warmup was given in epochs says ``sched.warmup_iters``. Its run
        continues on its own schedule only if ``sched.warmup_epochs`` is the same length; that matters
        only while either warmup is not over, so a run past both resumes as it is."""
        if warmup_iters is None:
            return
        was, now = warmup_iters / self.steps_per_epoch, self.cfg.sched.warmup_epochs
        if not math.isclose(was, now, rel_tol=1e-3, abs_tol=1e-9) and step < max(warmup_iters,
                                                                                  now * self.steps_per_epoch):
            raise CheckpointError(f"{path} was trained with sched.warmup_iters={warmup_iters}, which is "
                                  f"{was:.4g} epochs of {self.steps_per_epoch} steps; warmups are in epochs now: "
                                  f"resume with sched.warmup_epochs={was:.4g}, or start a new run")

    # -- signals ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Saves where the run is and ends it, after a SIGTERM or SIGINT."""
        self.save("last.pt")
        name = signal.Signals(self.stop_signal).name
        raise Interrupted(f"stopped by {name} at epoch {self.epoch + 1}, step {self.step}; saved "
                          f"{self.ckpt_dir / 'last.pt'}; {self.resume_hint()}", self.stop_signal)

    def stop_requested(self, stopping_ranks: float | None = None) -> bool:
        """Whether a SIGTERM or SIGINT reached this process or, under DDP, any other.

        Asked of every rank at the same points, so that all stop after the same step: a rank
        that stopped alone would leave the others waiting in their next collective. Under DDP it
        sums every rank's flag, unless ``stopping_ranks`` is that sum already (the training step's
        own reduction carries it); a signal that comes after that sum is seen at the next step.
        """
        if not self.dist.enabled:
            return self.stop_signal is not None
        if stopping_ranks is None:
            flag = torch.tensor([0.0 if self.stop_signal is None else 1.0], device=self.device)
            stopping_ranks = distributed.all_reduce_sum(flag, self.dist).item()
        if not stopping_ranks:
            return False
        if self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return True

    def resume_hint(self) -> str:
        if self.cfg.resume == "if_exists":
            return "run the same command again to continue (resume=if_exists)"
        return f"continue with resume=auto (or {override('resume', str(self.ckpt_dir / 'last.pt'))})"

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
