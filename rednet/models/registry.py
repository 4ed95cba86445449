"""Model names -> builder functions, as in timm: ``create_model("rednet26", num_classes=10)``."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered names, by family and then depth: rednet18, rednet26, ..., resnet50."""
    def family_depth(name: str) -> tuple[str, int]:
        family = name.rstrip("0123456789")
        return family, int("0" + name[len(family):])

    return sorted(_MODELS, key=family_depth)


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Builds a registered model. Keyword arguments: ``in_chans``, ``cifar_stem``, ``kernel_size``,
    ``group_channels``, ``reduction_ratio``, ``zero_init_residual``, ``drop_path_rate``,
    ``fused_generator``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    from rednet.models.resnet import ResNet  # the signature every builder forwards to

    accepted = set(inspect.signature(ResNet).parameters) - {"block", "layers", "involution"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"create_model({name!r}) got unknown argument(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


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
        from rednet.models.weights import load_weights

        load_weights(model, m.pretrained, drop_head=m.drop_head)
    return model
