"""The run context: what every command sets up from ``cfg.trainer`` before it touches data or a
model. The device, the process group under DDP, the autocast dtype, the memory layout and
compilation, the batch each rank loads, and the run folder, decided in one place, so that
training, evaluation and every other command run a checkpoint the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from rednet.engine import distributed
from rednet.engine.distributed import DistInfo
from rednet.engine.precision import resolve_auto, resolve_device, resolve_precision
from rednet.errors import ConfigError


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


def setup_run(cfg: DictConfig, run_dir: str | Path) -> RunContext:
    """The context for ``cfg``. Under ``trainer.strategy=ddp`` this joins the process group, and
    every rank takes rank 0's run folder (each resolved ``${now:...}`` by itself)."""
    t = cfg.trainer
    launched = distributed.env_info()
    check_launch(cfg, launched.world_size)
    device = resolve_device(str(t.device), launched.local_rank)
    if t.strategy == "ddp" and t.sync_batchnorm and device.type != "cuda":
        # PyTorch's SyncBatchNorm raises in its first training forward on any other device.
        raise ConfigError(f"trainer.sync_batchnorm=true needs CUDA: PyTorch's SyncBatchNorm does not run on "
                          f"the {device.type}; set trainer.sync_batchnorm=false")
    dist = distributed.init_distributed(device, t.ddp_timeout_s) if t.strategy == "ddp" else DistInfo()
    return RunContext(
        device=device, dist=dist, dtype=resolve_precision(str(t.precision), device),
        channels_last=resolve_auto("channels_last", t.channels_last, device),
        compile=resolve_auto("compile", t.compile, device),
        batch_per_rank=cfg.data.batch_size // dist.world_size,
        run_dir=Path(distributed.broadcast_object(str(run_dir), dist)))
