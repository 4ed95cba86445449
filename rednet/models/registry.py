"""Model names -> builder functions, as in timm; each builder module registers its own."""

from __future__ import annotations

from typing import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered names, by family and then depth: rednet18, rednet26, ..., resnet50."""
    def family_depth(name: str) -> tuple[str, int]:
        family = name.rstrip("0123456789")
        return family, int("0" + name[len(family):])

    return sorted(MODELS, key=family_depth)
