"""DDP helpers. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (or
:func:`rednet.integrations.submitit.env_from_submitit`, in a submitit job); without them we are one process."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from rednet.errors import ConfigError, UserError


class LostProcess(UserError):
    """Another process of the run died or stopped answering. Not the user's mistake, but one line
    says it better than a traceback from every survivor; torchrun restarts the group if allowed."""

    exit_code = 1


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """What torchrun (or srun + torchrun) told this process, before any process group exists."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def restart_count() -> int:
    """How often torchrun (``--max-restarts``) has restarted this worker group: 0 on the first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def init_distributed(device: torch.device, timeout_s: float = 1800) -> DistInfo:
    """Joins the process group. Joining, and every collective after it, waits at most ``timeout_s``
    for the other processes, so one that never started, died or hangs stops the rest within that
    time, with one line (:class:`LostProcess`), instead of never."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ConfigError(f"launched as {info.world_size} processes (WORLD_SIZE) but {' and '.join(missing)} "
                              f"is not set; start them with torchrun, or set MASTER_ADDR and MASTER_PORT")
        prefix = _prefix_of_this_start()
        timeout = datetime.timedelta(seconds=timeout_s)
        with _cpp_log_held() as stderr_fd:
            # gloo's connect can wait past its timeout for a peer that accepted but never answers
            # (seen here: minutes at 0% CPU), and C++ cannot be interrupted from Python: a watchdog
            # ends the process with the line, a moment after the store's own timeout had its chance.
            watchdog = threading.Timer(timeout_s + _WATCHDOG_GRACE_S, _give_up,
                                       [stderr_fd, _join_failure(info, timeout_s, f"no answer within {timeout_s:g} s")])
            watchdog.daemon = True
            watchdog.start()
            try:
                # The store torch makes for env://: rank 0's, or torchrun's own where torchrun lends it.
                store, _, _ = next(rendezvous("env://", info.rank, info.world_size, timeout=timeout))
                # NCCL for GPUs, gloo for CPUs (tests, debugging).
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        store=dist.PrefixStore(prefix, store), rank=info.rank,
                                        world_size=info.world_size, timeout=timeout,
                                        device_id=device if device.type == "cuda" else None)
            except RuntimeError as error:  # the store's DistErrors and gloo's own errors alike
                raise LostProcess(_join_failure(info, timeout_s, _reason(error))) from None
            finally:
                watchdog.cancel()
    return info


# How long after ddp_timeout_s the watchdog waits for the store or gloo to raise by themselves.
_WATCHDOG_GRACE_S = 2.0


def _give_up(stderr_fd: int, line: str) -> None:
    # As rednet.cli.fail writes it, in one write; os._exit because the main thread sits in C++.
    os.write(stderr_fd, f"error: {line}\n".encode())
    os._exit(LostProcess.exit_code)


@contextlib.contextmanager
def _cpp_log_held():
    """Holds back what C++ writes to stderr while the process joins: the store's and gloo's retry
    warnings and errors, each with a C++ stack. Shown if the join succeeds; dropped if it fails,
    where the one line says it all. Yields the real stderr's descriptor. ``TORCH_CPP_LOG_LEVEL``
    set by the user means they want that log: then nothing is held."""
    if os.environ.get("TORCH_CPP_LOG_LEVEL"):
        yield 2
        return
    sys.stderr.flush()
    real = os.dup(2)
    joined = False
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield real
                joined = True
            finally:
                os.dup2(real, 2)
                if joined and held.seek(0, os.SEEK_END):
                    held.seek(0)
                    sys.stderr.flush()
                    os.write(2, held.read())
    finally:
        os.close(real)


def _prefix_of_this_start() -> str:
    """Where the process group keeps its keys in the store, for this start of the worker group.

    torchrun lends its own store to the workers (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) and
    keeps it across ``--max-restarts`` restarts with the previous group's keys in it: a restarted
    rank that reads them before the new rank 0 overwrites them connects to a process that is gone
    (gloo: "Connection refused", after three quick retries; PyTorch issue 135712). So each start
    gets keys of its own, named by its restart count. All ranks agree on that count only when one
    torchrun started them all: across nodes the counts drift apart, so there the lent store is refused.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "default_pg"  # a store of this start alone: torch's own name
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        raise ConfigError("torchrun --max-restarts on several nodes keeps its store across restarts, and a "
                          "restarted group can then fail to connect (PyTorch issue 135712); launch with "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...")
    return f"rednet/start-{restart_count()}"


def _reason(error: BaseException) -> str:
    """The first line of a torch or gloo error, without gloo's ``[source.cc:123]`` prefix."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).rstrip(".")


def _join_failure(info: DistInfo, timeout_s: float, reason: str) -> str:
    """One line: what this rank waited for, why it stopped, and what to check."""
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if "EADDRINUSE" in reason:
        return (f"rank 0 cannot open the run's store at {where}: another program uses the port; launch with "
                f"another MASTER_PORT (torchrun --master-port=N)")
    waited = (f"the other {info.world_size - 1} process(es) to join its store at {where}" if info.is_main
              else f"rank 0's store at {where} and the other processes")
    return (f"rank {info.rank} of {info.world_size} waited up to trainer.ddp_timeout_s={timeout_s:g} s for {waited} "
            f"({reason}); check that all {info.world_size} processes were started, with the same MASTER_ADDR "
            f"and MASTER_PORT, and that {where} is reachable from each of them")


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` (tensors in plain containers), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    # As torch.save bytes: plain pickling fails on some tensor dtypes (numpy's uint32 RNG keys).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gathered]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Rank 0 runs the block first (a dataset download, say), the other ranks after it."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


# gloo's RuntimeErrors name their source file (".../gloo/transport/tcp/pair.cc"), except the one a
# pair raises when its own timeout closes it, met in DDP's buffer broadcast when a rank hangs.
_GLOO_ERRORS = ("gloo", "caused pair closure")


def is_communication_error(error: BaseException) -> bool:
    # NCCL and the rendezvous store raise DistError; gloo raises RuntimeErrors from its own sources.
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in _GLOO_ERRORS))


@contextlib.contextmanager
def lost_process_errors(info: DistInfo | None = None, last_checkpoint: Path | None = None):
    """Turns a collective that failed because another process is gone into one :class:`LostProcess` line.

    Around a whole command (``rednet.cli.guarded``) it covers every collective of a DDP run: the
    set-up's broadcasts, training, evaluation. The training loop adds its ``last_checkpoint``, which
    the line names for the restart.
    """
    info = env_info() if info is None else info
    try:
        yield
    except RuntimeError as error:
        if not (info.enabled and is_communication_error(error)):
            raise
        # gloo: "[.../pair.cc:545] Read error [10.0.0.2]:5865: Connection reset by peer. This is typically ..."
        reason = _reason(error).split(". ")[0]
        if last_checkpoint is None:
            then = "the other processes' output says why they stopped"
        elif last_checkpoint.is_file():
            then = f"the last checkpoint is {last_checkpoint}, where a restart with resume=if_exists continues"
        else:
            then = "no checkpoint was written yet"
        raise LostProcess(f"rank {info.rank} lost another process of the run ({reason}); {then}") from error


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
