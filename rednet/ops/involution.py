"""The involution operator as a function, with one entry point for every implementation.

An involution kernel is generated per output pixel and shared by the channels of a group:

    out[b, c, i, j] = sum_{u, v} weight[b, g(c), u*K + v, i, j]
                               * x[b, c, i*s + u*d - p, j*s + v*d - p]

with g(c) = c // (C / G) and p = d * (K - 1) // 2 (zero padding).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class Impl(NamedTuple):
    """One implementation: how to run it, where it runs, and how much it is preferred."""

    forward: Callable  # (x, weight, kernel_size, stride, dilation) -> out
    # (grad_out, x, weight, kernel_size, stride, dilation, need_x, need_w) -> (grad_x | None, grad_w | None);
    # None for an implementation autograd differentiates by itself (the unfold reference).
    backward: Callable | None
    runs_on: Callable[[torch.device], bool]
    rank: int  # lower is preferred by impl="auto": the measured winner, see scripts/bench_involution.py


# Implementations register themselves from their own modules, so this file stays the one dispatcher.
_IMPLS: dict[str, Impl] = {}


def register_impl(name: str, forward: Callable, backward: Callable | None, runs_on: Callable[[torch.device], bool],
                  rank: int) -> None:
    """``forward`` and ``backward`` receive checked, same-dtype inputs in any memory layout."""
    _IMPLS[name] = Impl(forward, backward, runs_on, rank)


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """Names of the implementations that run on ``device``, best first for ``impl="auto"``."""
    device = torch.device(device)
    usable = [(entry.rank, name) for name, entry in _IMPLS.items() if entry.runs_on(device)]
    return [name for _, name in sorted(usable)]


def output_size(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    padding = dilation * (kernel_size - 1) // 2
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def check_args(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> int:
    """Validates the arguments and returns the number of groups."""
    # bool is an int subclass: without the explicit check, kernel_size=True would mean 1.
    def is_size(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not is_size(kernel_size) or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    if not is_size(stride):
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if not is_size(dilation):
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be (B, G, K*K, Ho, Wo), got shape {tuple(weight.shape)}")
    b, c, h, w = x.shape
    if 0 in (c, h, w):  # an empty batch (b == 0) is fine, as for a convolution
        raise ValueError(f"x must have at least one channel and pixel, got shape {tuple(x.shape)}")
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


register_impl("unfold", involution_unfold, None, lambda device: True, rank=100)


def new_output(x: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised output or input gradient in ``x``'s layout (channels_last or NCHW).

    Every implementation with an explicit backward allocates through this function and
    :func:`new_weight_grad`: torch.compile trusts the layouts the fake kernels below announce, and
    Inductor checks them against the real outputs.
    """
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


def new_weight_grad(weight: torch.Tensor) -> torch.Tensor:
    # empty_like keeps the weight's strides when they are dense (a view of a channels_last conv
    # output is), so the gradient reaches that conv in the layout it computes in.
    return torch.empty_like(weight)


# The fused implementations are PyTorch custom operators, so torch.compile sees each involution as
# one opaque node with a known output shape: the whole model compiles into one graph, with no
# graph break (and no recompilation per block shape) at every involution. Tracing *into* them is
# neither useful (they are already fused or hand-scheduled) nor possible (AOTAutograd failed on
# shift's views of reused buffers, torch 2.14).
@torch.library.custom_op("rednet::involution", mutates_args=())
def _involution_op(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int,
                   impl: str) -> torch.Tensor:
    if x.shape[0] == 0:  # an empty batch, which the chunked and tiled kernels need not handle
        return new_output(x, (0, x.shape[1], *weight.shape[-2:]))
    # Autocast stays on inside a custom operator; the implementations choose their own precision.
    with torch.autocast(x.device.type, enabled=False):
        return _IMPLS[impl].forward(x, weight, kernel_size, stride, dilation)


@_involution_op.register_fake
def _(x, weight, kernel_size, stride, dilation, impl):
    b, c = x.shape[:2]
    ho, wo = weight.shape[-2:]
    return new_output(x, (b, c, ho, wo))


@torch.library.custom_op("rednet::involution_backward", mutates_args=())
def _involution_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int,
                            stride: int, dilation: int, impl: str, need_x: bool,
                            need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] == 0:
        grad_x, grad_w = new_output(x, x.shape), new_weight_grad(weight)
    else:
        with torch.autocast(x.device.type, enabled=False):
            grad_x, grad_w = _IMPLS[impl].backward(grad_out, x, weight, kernel_size, stride, dilation, need_x,
                                                   need_w)
    # A custom operator returns tensors, never None: an unneeded gradient is an empty tensor.
    return (grad_x if need_x else x.new_empty(0)), (grad_w if need_w else weight.new_empty(0))


@_involution_backward_op.register_fake
def _(grad_out, x, weight, kernel_size, stride, dilation, impl, need_x, need_w):
    grad_x = new_output(x, x.shape) if need_x else x.new_empty(0)
    grad_w = new_weight_grad(weight) if need_w else weight.new_empty(0)
    return grad_x, grad_w


def _save_for_backward(ctx, inputs, output):
    x, weight, *geometry_and_impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = tuple(geometry_and_impl)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = _involution_backward_op(grad_out.to(x.dtype), x, weight, *ctx.args, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None, None


_involution_op.register_autograd(_backward, setup_context=_save_for_backward)


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
    elif x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}; cast one of them, or run under torch.autocast")
    if _IMPLS[impl].backward is None:
        return _IMPLS[impl].forward(x, weight, kernel_size, stride, dilation)
    return _involution_op(x, weight, kernel_size, stride, dilation, impl)
