"""Device and numeric precision: which device, which autocast dtype, and whether to scale the loss;
and the speed settings whose best value depends on the device (memory layout, torch.compile)."""

from __future__ import annotations

import contextlib

import torch

from rednet.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU when there is one; under DDP each rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto`` is bf16 on GPUs that support it (no loss scaling needed), fp16 with a GradScaler on
    older GPUs, and fp32 on the CPU, where autocast is slower than fp32 on most processors.
    """
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is needed only for fp16, whose range underflows small gradients."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# What ``trainer.channels_last=null`` and ``trainer.compile=null`` mean on each kind of device, by
# measurement (README, Speed). Absent means off.
# - channels_last on CUDA: on an H100 (bf16, batch 128) RedNet-26 trained at 2257 img/s against
#   1848 in NCHW, and ResNet-50 at 3699 against 2117: cuDNN's NHWC convolutions and BatchNorm.
# - channels_last on the CPU: RedNet-26 at 224 px trains 1.1-1.4x faster, but not measured yet at
#   the small images CPU runs use (digits, CIFAR), so off.
# - compile: not yet measured on a GPU (scripts/bench_gpu.sh models measures it); on the CPU it
#   costs about a minute of compilation for a few percent, so off.
AUTO = {"channels_last": {"cuda": True}, "compile": {}}


def resolve_auto(key: str, value: bool | None, device: torch.device) -> bool:
    """``trainer.channels_last`` or ``trainer.compile`` as a bool: null takes :data:`AUTO`."""
    if value is None:
        return AUTO[key].get(device.type, False)
    return bool(value)
