"""The run context: what every command sets up from ``cfg.trainer`` before it touches data or a
model. The device, the process group under DDP, the autocast dtype, the memory layout and
compilation, the batch each rank loads, and the run folder, decided in one place, so that
training, evaluation and every other command run a checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from rednet.engine import distributed
from rednet.engine.distributed import DistInfo
from rednet.engine.precision import resolve_auto, resolve_device, resolve_precision
from rednet.errors import ConfigError

log = logging.getLogger("rednet")
LOCK_NAME = ".run.lock"

@dataclass(frozen=True)
class RunContext:
    device: torch.device
    dist: DistInfo
    dtype: torch.dtype | None  # the autocast dtype; None: plain fp32
    channels_last: bool
    compile: bool
    batch_per_rank: int  # data.batch_size is the global batch
    run_dir: Path


def check_launch(cfg: DictConfig, world_size: int) -> None:
    """How the command was launched must fit the config. Checked before any process group forms:
    a rank that failed after joining would leave the others waiting."""
    strategy = cfg.trainer.strategy
    if world_size > 1 and strategy != "ddp":
        raise ConfigError(f"launched as {world_size} processes (torchrun) but trainer.strategy={strategy}; "
                          f"add trainer=ddp")
    if strategy == "ddp" and cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide across "
                          f"{world_size} processes; use a multiple of {world_size}")


def intra_op_threads(cores: int, workers: int, env: Mapping[str, str], default: int) -> int | None:
    """How many intra-op threads a process should run beside ``workers`` loader processes on
    ``cores`` cores, or None to leave PyTorch's ``default``: the user chose (OMP_NUM_THREADS), or there
    is room. OpenMP threads that spin on the cores the loader workers need slow both down."""
    if env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None
    threads = max(1, cores - workers)
    return threads if threads < default else None


def _size_threads(workers: int, rank_processes: int) -> None:
    cores = max(1, len(os.sched_getaffinity(0)) // rank_processes)
    threads = intra_op_threads(cores, workers, os.environ, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
        log.info(f"intra-op threads: {threads} ({cores} cores less data.num_workers={workers} loader workers; "
                 f"set OMP_NUM_THREADS to choose)")


# Run folders whose lock this process holds: folder -> [fd, how many run contexts use it]. A second
# Trainer on the same folder in one process (a resume in a notebook or a test) is the same run.
_held: dict[Path, list[int]] = {}


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError):
        text = lock.read_text().strip()
        if text:
            return text
    return "another process"


def lock_run_dir(run_dir: Path, wait_s: float = 0.0) -> None:
    """Holds ``run_dir``'s lock file for this process's life (the OS releases it when the process dies,
    however it dies), so a second live run cannot write into the same folder; a dead one's folder is
    free at once. Raises ConfigError naming the live run."""
    key = run_dir.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:  # a restarted group: the killed run may still be exiting
                time.sleep(0.2)
                continue
            raise ConfigError(f"run folder {run_dir} is in use by a live run ({_holder(lock)}); wait for it to end, "
                              f"or start this one in another folder: hydra.run.dir=path/to/folder") from None
        # The holder before us may have removed the file after we opened it: a lock on that is no lock.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    # Written in place, not through rednet.io's atomic rename, which would swap out the locked file.
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    command = command if len(command) <= 100 else command[:97] + "..."  # the refusal stays one readable line
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n".encode())
    _held[key] = [fd, 1]


def unlock_run_dir(run_dir: Path) -> None:
    key = run_dir.resolve()
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[key]
        with contextlib.suppress(OSError):  # removed while still held: the next run finds no stale file
            (run_dir / LOCK_NAME).unlink()
        os.close(held[0])


def setup_run(cfg: DictConfig, run_dir: str | Path) -> RunContext:
    """The context for ``cfg``. Under ``trainer.strategy=ddp`` this joins the process group, and
    every rank takes rank 0's run folder (each resolved ``${now:...}`` by itself). Rank 0 holds the
    run folder's lock while the context lives (:func:`lock_run_dir`), and the intra-op threads are
    sized against the loader workers (:func:`intra_op_threads`)."""
    t = cfg.trainer
    launched = distributed.env_info()
    check_launch(cfg, launched.world_size)
    device = resolve_device(str(t.device), launched.local_rank)
    if t.strategy == "ddp" and t.sync_batchnorm and device.type != "cuda":
        # PyTorch's SyncBatchNorm raises in its first training forward on any other device.
        raise ConfigError(f"trainer.sync_batchnorm=true needs CUDA: PyTorch's SyncBatchNorm does not run on "
                          f"the {device.type}; set trainer.sync_batchnorm=false")
    dist = distributed.init_distributed(device, t.ddp_timeout_s) if t.strategy == "ddp" else DistInfo()
    refusal = None
    if dist.is_main:
        try:
            lock_run_dir(Path(run_dir), wait_s=5.0 if distributed.restart_count() else 0.0)
        except ConfigError as e:
            refusal = str(e)
    # Every rank learns the folder and the refusal together, so that all of them stop, in one line.
    run_dir, refusal = distributed.broadcast_object((str(run_dir), refusal), dist)
    if refusal:
        raise ConfigError(refusal)
    _size_threads(int(cfg.data.get("num_workers") or 0), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    ctx = RunContext(
        device=device, dist=dist, dtype=resolve_precision(str(t.precision), device),
        channels_last=resolve_auto("channels_last", t.channels_last, device),
        compile=resolve_auto("compile", t.compile, device),
        batch_per_rank=cfg.data.batch_size // dist.world_size,
        run_dir=Path(run_dir))
    if dist.is_main:
        weakref.finalize(ctx, unlock_run_dir, Path(run_dir))
    return ctx
