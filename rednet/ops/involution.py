"""The involution operator as a function, with one entry point for every implementation.

An involution kernel is generated per output pixel and shared by the channels of a group:

    out[b, c, i, j] = sum_{u, v} weight[b, g(c), u*K + v, i, j]
                               * x[b, c, i*s + u*d - p, j*s + v*d - p]

with g(c) = c // (C / G) and p = d * (K - 1) // 2 (zero padding).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# name -> (function, predicate telling whether it runs on a device, rank). Implementations
# register themselves from their own modules, so this file stays the one dispatcher; the rank
# (lower is preferred) records which one measured fastest, see scripts/bench_involution.py.
_IMPLS: dict[str, tuple[Callable, Callable[[torch.device], bool], int]] = {}


def register_impl(name: str, fn: Callable, runs_on: Callable[[torch.device], bool], rank: int) -> None:
    """``fn(x, weight, kernel_size, stride, dilation)`` receives checked, same-dtype inputs."""
    _IMPLS[name] = (fn, runs_on, rank)


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """Names of the implementations that run on ``device``, best first for ``impl="auto"``."""
    device = torch.device(device)
    usable = [(rank, name) for name, (_, runs_on, rank) in _IMPLS.items() if runs_on(device)]
    return [name for _, name in sorted(usable)]


def output_size(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    padding = dilation * (kernel_size - 1) // 2
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def check_args(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> int:
    """Validates the arguments and returns the number of groups."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be (B, G, K*K, Ho, Wo), got shape {tuple(weight.shape)}")
    b, c, h, w = x.shape
    groups = weight.shape[1]
    if groups < 1 or c % groups != 0:
        raise ValueError(f"{c} channels are not divisible into {groups} groups")
    expected = (b, groups, kernel_size * kernel_size,
                output_size(h, kernel_size, stride, dilation), output_size(w, kernel_size, stride, dilation))
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the expected {expected} "
                         f"for x of shape {tuple(x.shape)}, kernel_size={kernel_size}, stride={stride}, "
                         f"dilation={dilation}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    return groups


def involution_unfold(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1,
                      dilation: int = 1) -> torch.Tensor:
    """The exact reference: the official naive code's math. Materialises (B, C, K*K, Ho, Wo)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return involution_unfold(x.float(), weight.float(), kernel_size, stride, dilation).to(x.dtype)
    b, c, h, w = x.shape
    groups, kk, ho, wo = weight.shape[1:]
    padding = dilation * (kernel_size - 1) // 2
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(b, groups, c // groups, kk, ho, wo)
    return (weight.unsqueeze(2) * cols).sum(dim=3).view(b, c, ho, wo)


register_impl("unfold", involution_unfold, lambda device: True, rank=100)


# torch.compile runs around the operator, not through it: its implementations are already fused
# or hand-scheduled, and tracing shift's views of reused buffers fails in AOTAutograd (torch 2.14).
@torch.compiler.disable
def involution(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, dilation: int = 1,
               impl: str = "auto") -> torch.Tensor:
    """Involution of ``x`` (B, C, H, W) with per-pixel kernels ``weight`` (B, G, K*K, Ho, Wo).

    ``impl`` is one of :func:`available_impls` for the device, or ``"auto"`` for the fastest.
    Under ``torch.autocast`` both inputs are cast to the autocast dtype, like a convolution; every
    implementation accumulates in float32 for float16 and bfloat16 inputs.
    """
    check_args(x, weight, kernel_size, stride, dilation)
    names = available_impls(x.device)
    if impl == "auto":
        impl = names[0]
    elif impl not in names:
        known = sorted(_IMPLS)
        if impl in known:
            raise ValueError(f"involution impl {impl!r} does not run on {x.device}; choose one of {names}")
        raise ValueError(f"unknown involution impl {impl!r}; choose one of {known} or 'auto'")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _IMPLS[impl][0](x, weight, kernel_size, stride, dilation)
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}; cast one of them, or run under torch.autocast")
    return _IMPLS[impl][0](x, weight, kernel_size, stride, dilation)
