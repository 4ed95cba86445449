"""DDP helpers. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (or
:func:`rednet.integrations.submitit.env_from_submitit`, in a submitit job); without them we are one process."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rednet.errors import UserError


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


def shared_store_warning() -> str | None:
    """A warning for torchrun restarts that can fail, or None.

    By default torchrun's agent lends its store to the workers and keeps it across restarts, with
    the previous group's keys in it: a restarted worker can read the old addresses and fail to
    connect (PyTorch issue 135712). torchrun's own switch turns the sharing off.
    """
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: torchrun shares its store with the workers, so a restart can fail to connect (PyTorch "
                "issue 135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=N ...")
    return None


def init_distributed(device: torch.device, timeout_s: float = 1800) -> DistInfo:
    """Joins the process group. Every collective then waits at most ``timeout_s`` for the other
    processes, so one that died or hangs stops the rest within that time instead of never."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        # NCCL for GPUs, gloo for CPUs (tests, debugging).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


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
def lost_process_errors(info: DistInfo, last_checkpoint: Path):
    """Turns a collective that failed because another process is gone into one :class:`LostProcess` line."""
    try:
        yield
    except RuntimeError as error:
        if not (info.enabled and is_communication_error(error)):
            raise
        # gloo: "[.../pair.cc:545] Read error [10.0.0.2]:5865: Connection reset by peer. This is typically ..."
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0]).split(". ")[0]
        saved = (f"the last checkpoint is {last_checkpoint}, where a restart with resume=if_exists continues"
                 if last_checkpoint.is_file() else "no checkpoint was written yet")
        raise LostProcess(f"rank {info.rank} lost another process of the run ({reason}); {saved}") from error


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
