"""The involution layer: a kernel generator plus the involution operator (Li et al., CVPR 2021)."""

from __future__ import annotations

import torch
from torch import nn

from rednet.ops import fused_involution, involution


class ConvNormAct(nn.Module):
    """Conv2d, optional BatchNorm, optional ReLU.

    The attribute names (``conv``, ``bn``) mirror mmcv's ConvModule, so official RedNet
    checkpoints map onto this module key for key.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                              bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Involution(nn.Module):
    """Involution with a kernel generated from the input at every output pixel.

    The generator is 1x1 conv -> BN -> ReLU -> 1x1 conv (with bias), giving G*K*K maps with
    G = channels / group_channels. At stride > 1 it sees an average-pooled input, as in the
    official code. Unlike the official code, the pooling rounds up (``ceil_mode``), so its map
    has the same size as the strided output for odd inputs too; for even inputs it is identical.

    ``fused_generator=True`` runs the generator's second convolution and the involution as one
    Triton operator (:func:`rednet.ops.fused_involution`) that never stores the G*K*K-channel
    kernel map. The parameters and state_dict keys are the same; where Triton cannot run (the CPU
    without ``TRITON_INTERPRET=1``) the layer computes exactly what it computes without the option.
    ``impl`` chooses the involution of the unfused path.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction_ratio: int = 4, impl: str = "auto", fused_generator: bool = False) -> None:
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"Involution: {channels} channels are not divisible into groups of "
                             f"{group_channels}; choose a group_channels that divides {channels}")
        if kernel_size % 2 == 0:
            raise ValueError(f"Involution: kernel_size must be odd, got {kernel_size}")
        if not 1 <= reduction_ratio <= channels:
            raise ValueError(f"Involution: reduction_ratio={reduction_ratio} leaves {channels} channels with no "
                             f"kernel-generator channels; choose one from 1 to {channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = channels // group_channels
        self.impl = impl
        self.fused_generator = fused_generator
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv1 = ConvNormAct(channels, channels // reduction_ratio, 1)
        self.conv2 = ConvNormAct(channels // reduction_ratio, kernel_size * kernel_size * self.groups, 1,
                                 norm=False, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(self.avgpool(x))
        if self.fused_generator:
            conv = self.conv2.conv
            return fused_involution(x, reduced, conv.weight, conv.bias, self.kernel_size, self.stride, impl=self.impl)
        weight = self.conv2(reduced)
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, self.kernel_size * self.kernel_size, h, w)
        return involution(x, weight, self.kernel_size, self.stride, impl=self.impl)

    def extra_repr(self) -> str:
        fused = ", fused_generator=True" if self.fused_generator else ""
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}{fused}")
