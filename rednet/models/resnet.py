"""RedNet and the ResNet baselines, built from one set of blocks.

RedNet replaces the 3x3 convolution in the middle of every residual block by a 7x7 involution,
and the stem's middle layer by a 3x3 involution. With ``involution=False`` the same builders
give ordinary ResNets, so a comparison differs only in the operator. State-dict keys follow the
official mmcls release: ``backbone.stem``, ``backbone.layer1..4``, ``head.fc``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from rednet.models.involution import ConvNormAct, Involution
from rednet.models.registry import register_model


def _spatial(channels: int, stride: int, involution: bool, kernel_size: int, group_channels: int,
             reduction_ratio: int, fused_generator: bool) -> nn.Module:
    """The block's spatial mixing layer: a KxK involution, or the 3x3 convolution it replaces."""
    if involution:
        return Involution(channels, kernel_size, stride, group_channels, reduction_ratio,
                          fused_generator=fused_generator)
    return nn.Conv2d(channels, channels, 3, stride, padding=1, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """3x3 conv (carrying the stride) -> spatial layer; the RedNet-18 block when involution=True."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, spatial: Callable[[int, int], nn.Module],
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = spatial(channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, channels, stride)
        self.drop_path = StochasticDepth(drop_path, "row")  # drops a sample's whole residual branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 -> spatial layer (carrying the stride) -> 1x1, as in torchvision's ResNet v1.5."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, spatial: Callable[[int, int], nn.Module],
                 drop_path: float = 0.0) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = spatial(channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.drop_path = StochasticDepth(drop_path, "row")  # drops a sample's whole residual branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


# The stem's involution is the narrowest in every RedNet: group_channels and reduction_ratio
# must fit it (rednet.config.validate checks this before a run builds anything).
STEM_INVOLUTION_CHANNELS = 32


def _stem(in_chans: int, involution: bool, cifar_stem: bool, group_channels: int, reduction_ratio: int,
          fused_generator: bool) -> nn.Sequential:
    """RedNet: conv3x3/2 -> involution3x3 -> BN -> ReLU -> conv3x3, 64 channels out.
    ResNet: torchvision's conv7x7/2 (so resnet50 is torchvision's resnet50 parameter for parameter).
    The CIFAR variant keeps the module names but does not downsample, and uses a 3x3 conv."""
    stride = 1 if cifar_stem else 2
    if involution:
        width = STEM_INVOLUTION_CHANNELS
        return nn.Sequential(
            ConvNormAct(in_chans, width, 3, stride),
            Involution(width, 3, 1, group_channels, reduction_ratio, fused_generator=fused_generator),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            ConvNormAct(width, 64, 3),
        )
    return nn.Sequential(ConvNormAct(in_chans, 64, 3 if cifar_stem else 7, stride))


class Backbone(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], in_chans: int,
                 involution: bool, cifar_stem: bool, kernel_size: int, group_channels: int,
                 reduction_ratio: int, drop_path_rate: float, fused_generator: bool) -> None:
        super().__init__()
        self.stem = _stem(in_chans, involution, cifar_stem, group_channels, reduction_ratio, fused_generator)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, padding=1)
        spatial = partial(_spatial, involution=involution, kernel_size=kernel_size,
                          group_channels=group_channels, reduction_ratio=reduction_ratio,
                          fused_generator=fused_generator)
        # Stochastic depth grows linearly with the block index, as in timm.
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        in_channels = 64
        for i, depth in enumerate(layers):
            channels = 64 * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_channels, channels, stride, spatial, rates.pop(0)))
                in_channels = channels * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Head(nn.Module):
    """Global average pooling and a linear classifier (mmcls's LinearClsHead); with ``num_classes=0``
    no classifier, so the model returns its pooled features (timm's convention)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x.mean((2, 3)), 1)
        return x if pre_logits else self.fc(x)


class ResNet(nn.Module):
    """A classifier: ``backbone`` (stem and four stages) and ``head`` (pooling and ``fc``)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 involution: bool = True, in_chans: int = 3, cifar_stem: bool = False, kernel_size: int = 7,
                 group_channels: int = 16, reduction_ratio: int = 4, zero_init_residual: bool = True,
                 drop_path_rate: float = 0.0, fused_generator: bool = False) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be at least 1, or 0 for no classifier, got {num_classes}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.backbone = Backbone(block, layers, in_chans, involution, cifar_stem, kernel_size, group_channels,
                                 reduction_ratio, drop_path_rate, fused_generator)
        self.num_features = self.backbone.out_channels  # what the classifier sees (timm's name)
        self.head = Head(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as the identity, which the official recipe relies on.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces ``head.fc`` with a fresh one, for fine-tuning on another label set; ``num_classes=0``
        removes it. The signature is timm's; average pooling is the only pooling."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be at least 1, or 0 for no classifier, got {num_classes}")
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported: RedNet pools by averaging ('avg')")
        like = next(self.backbone.parameters())
        self.num_classes = num_classes
        self.head = Head(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)


def _build(block, layers, involution, **kwargs) -> ResNet:
    return ResNet(block, layers, involution=involution, **kwargs)


@register_model
def rednet18(**kwargs) -> ResNet:
    """RedNet-18: ResNet-18's BasicBlocks (2, 2, 2, 2) with each block's second 3x3 conv replaced by a
    7x7 involution, and the RedNet stem.

    No official RedNet-18 exists. This is the definition reported in the official repository's
    issue #4 (92.1% on CIFAR-10 against 93.9% for ResNet-18).
    """
    return _build(BasicBlock, (2, 2, 2, 2), True, **kwargs)


@register_model
def rednet26(**kwargs) -> ResNet:
    """RedNet-26, the official architecture: 9.23M parameters, 1.7 GMACs at 224x224."""
    return _build(Bottleneck, (1, 2, 4, 1), True, **kwargs)


@register_model
def rednet38(**kwargs) -> ResNet:
    """RedNet-38, the official architecture: 12.39M parameters."""
    return _build(Bottleneck, (2, 3, 5, 2), True, **kwargs)


@register_model
def rednet50(**kwargs) -> ResNet:
    """RedNet-50, the official architecture: 15.54M parameters."""
    return _build(Bottleneck, (3, 4, 6, 3), True, **kwargs)


@register_model
def rednet101(**kwargs) -> ResNet:
    """RedNet-101, the official architecture: 25.65M parameters."""
    return _build(Bottleneck, (3, 4, 23, 3), True, **kwargs)


@register_model
def rednet152(**kwargs) -> ResNet:
    """RedNet-152, the official architecture: 33.99M parameters."""
    return _build(Bottleneck, (3, 8, 36, 3), True, **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 from the same code as RedNet-18, with 3x3 convolutions."""
    return _build(BasicBlock, (2, 2, 2, 2), False, **kwargs)


@register_model
def resnet26(**kwargs) -> ResNet:
    """ResNet-26 from the same code as RedNet-26, with 3x3 convolutions."""
    return _build(Bottleneck, (1, 2, 4, 1), False, **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 from the same code as RedNet-50: torchvision's 25,557,032 parameters."""
    return _build(Bottleneck, (3, 4, 6, 3), False, **kwargs)
