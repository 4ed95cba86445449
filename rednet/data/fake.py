"""torchvision's FakeData: random images and labels, for throughput runs and smoke tests."""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig
from torchvision import datasets, transforms

from rednet.data.datamodule import DataModule, loader_kwargs, normalization, register_dataset
from rednet.errors import DataError


@register_dataset("fake")
def build_fake(cfg: DictConfig) -> DataModule:
    if not cfg.num_classes or cfg.num_classes < 1:
        raise DataError("data=fake needs data.num_classes, e.g. data.num_classes=10")
    if cfg.in_chans not in (1, 3):
        raise DataError(f"data.in_chans={cfg.in_chans} is not supported for fake data; set 3 (RGB) or 1 (grey)")
    if cfg.train_size < 1 or cfg.val_size < 1:
        raise DataError(f"data.train_size={cfg.train_size} and data.val_size={cfg.val_size} must be positive")
    shape = (cfg.in_chans, cfg.image_size, cfg.image_size)
    norm = normalization(cfg, cfg.in_chans, f"data.in_chans={cfg.in_chans}")
    # FakeData seeds image i with i + random_offset: this offset keeps every val image out of train.
    fake = partial(datasets.FakeData, image_size=shape, num_classes=cfg.num_classes, transform=transforms.PILToTensor())
    return DataModule(
        name="fake", class_names=[f"class_{i}" for i in range(cfg.num_classes)], in_chans=cfg.in_chans,
        image_size=cfg.image_size, **norm,
        make_train_set=partial(fake, size=cfg.train_size, random_offset=0),
        make_val_set=partial(fake, size=cfg.val_size, random_offset=cfg.train_size),
        **loader_kwargs(cfg),
    )
