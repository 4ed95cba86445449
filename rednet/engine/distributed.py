"""DDP helpers. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (or :func:`env_from_submitit`, in a
submitit job); without them we are one process."""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


def env_from_submitit() -> None:
    """Inside a job that submitit launched (``hydra/launcher=submitit_*``), sets what torchrun would
    have: RANK, WORLD_SIZE and LOCAL_RANK from the job's tasks (SLURM_PROCID, SLURM_NTASKS and
    SLURM_LOCALID on SLURM, read through submitit), MASTER_ADDR (the job's first node) and
    MASTER_PORT (derived from the job id, so that every task agrees and jobs sharing a node do not
    collide). Variables already set win: torchrun inside a job, or a MASTER_PORT of your own.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit

    job = submitit.JobEnvironment()
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job.job_id.encode()) % 20000))


def init_distributed(device: torch.device) -> DistInfo:
    info = env_info()
    if info.enabled and not dist.is_initialized():
        # NCCL for GPUs, gloo for CPUs (tests, debugging).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return info


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


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


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
