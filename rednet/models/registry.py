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
    return sorted(_MODELS, key=lambda name: (name.rstrip("0123456789"), int("0" + name[len(name.rstrip("0123456789")):])))


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Builds a registered model. Keyword arguments: ``in_chans``, ``cifar_stem``, ``kernel_size``,
    ``group_channels``, ``reduction_ratio``, ``zero_init_residual``, ``drop_path_rate``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    from rednet.models.resnet import ResNet  # the signature every builder forwards to

    accepted = set(inspect.signature(ResNet).parameters) - {"block", "layers", "involution"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"create_model({name!r}) got unknown argument(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
    return _MODELS[name](num_classes=num_classes, **kwargs)
