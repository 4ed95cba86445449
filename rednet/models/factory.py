"""Building models by name: ``create_model("rednet26", num_classes=10)`` (as in timm), and
``build_model`` for a ``model`` config node."""

from __future__ import annotations

import inspect

from torch import nn

from rednet.models.registry import MODELS, list_models
from rednet.models.resnet import ResNet  # the signature every builder forwards to
from rednet.models.weights import load_weights


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Builds a registered model. Keyword arguments: ``in_chans``, ``cifar_stem``, ``kernel_size``,
    ``group_channels``, ``reduction_ratio``, ``zero_init_residual``, ``drop_path_rate``,
    ``fused_generator``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    accepted = set(inspect.signature(ResNet).parameters) - {"block", "layers", "involution"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"create_model({name!r}) got unknown argument(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def use_cifar_stem(cfg_model, image_size: int) -> bool:
    """Small images would shrink to nothing through the ImageNet stem's 4x downsampling."""
    return image_size <= 64 if cfg_model.cifar_stem is None else cfg_model.cifar_stem


def build_model(cfg_model, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """The model a ``model`` config node describes, for data of ``num_classes``, ``in_chans`` and
    ``image_size``; ``model.pretrained`` weights are loaded into it."""
    m = cfg_model
    model = create_model(m.name, num_classes=num_classes, in_chans=in_chans,
                         cifar_stem=use_cifar_stem(m, image_size), kernel_size=m.kernel_size,
                         group_channels=m.group_channels, reduction_ratio=m.reduction_ratio,
                         zero_init_residual=m.zero_init_residual, drop_path_rate=m.drop_path_rate,
                         fused_generator=m.fused_generator)
    if m.pretrained:
        load_weights(model, m.pretrained, drop_head=m.drop_head)
    return model
