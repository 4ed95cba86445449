"""RedNet-18 to 152 in timm's model registry.

``import rednet`` registers them as soon as timm is imported (before or after rednet), without
importing timm itself; importing this module registers them at once. Then timm's tools work on them::

    import rednet, timm
    model = timm.create_model("rednet26", pretrained=False, num_classes=10)
    config = timm.data.resolve_data_config(model=model)  # 224 px, crop_pct 0.875, ImageNet mean/std
    official = timm.create_model("rednet26", pretrained=True,
                                 pretrained_cfg_overlay=dict(file="rednet26_8xb32_in1k.pth"))

No weights are hosted for timm: ``pretrained=True`` needs a local file, an official mmcls release
(``state_dict`` with ``backbone.``/``head.fc.`` keys) or one of our checkpoints (``model``). timm
loads it with ``weights_only=True`` and drops its classifier when ``num_classes`` differs.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from rednet.models import resnet
from rednet.models.resnet import ResNet

NAMES = ["rednet18", "rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]


def _cfg() -> dict:
    # The official ImageNet evaluation (mmcls): resize to 256, centre crop 224, bilinear.
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "backbone.stem.0.conv", "classifier": "head.fc", "paper_ids": "arXiv:2103.06255",
            "license": "apache-2.0"}


default_cfgs = generate_default_cfgs({name: _cfg() for name in NAMES})


def _create(variant: str, pretrained: bool, **kwargs) -> ResNet:
    # timm's train.py always passes these two; RedNet has one pooling and no dropout before its head.
    drop_rate, global_pool = kwargs.pop("drop_rate", 0.0), kwargs.pop("global_pool", "avg")
    if drop_rate:
        raise ValueError(f"{variant} has no dropout before its classifier: drop_rate must be 0, got {drop_rate}")
    if global_pool != "avg":
        raise ValueError(f"{variant} pools by averaging: global_pool must be 'avg', got {global_pool!r}")
    return build_model_with_cfg(getattr(resnet, variant), variant, pretrained, **kwargs)


@register_model
def rednet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet18", pretrained, **kwargs)


@register_model
def rednet26(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet26", pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet38", pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet50", pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet101", pretrained, **kwargs)


@register_model
def rednet152(pretrained: bool = False, **kwargs) -> ResNet:
    return _create("rednet152", pretrained, **kwargs)
