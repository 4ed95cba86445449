"""The DataModule that every dataset builds, the registry of dataset builders, and
:func:`build_datamodule`, which picks one. Each builder module registers itself with
:func:`register_dataset`; ``rednet/data/__init__.py`` imports them all."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from rednet.data.samplers import ResumableDistributedSampler, ShardSampler
from rednet.errors import DataError

# data.name -> the function that builds its DataModule from the data config node.
_BUILDERS: dict[str, Callable[[DictConfig], DataModule]] = {}


class DataModule:
    """A training and a validation set, what the model needs to know about them, and their loaders.

    Both sets yield uint8 images, and the loaders collate uint8 batches: a quarter of float32's
    bytes through the workers' shared memory and to the GPU. ``mean`` and ``std`` (per channel, on
    the 0-1 scale) are what :mod:`rednet.engine.feed` normalises them with, on the device.

    The sets are built on first access. Building a DataModule reads only what names the classes
    (a meta file, folder names), so evaluating never lists the training images of a large
    ImageFolder tree, and a user mistake in the layout is reported before anything slow starts.
    """

    def __init__(
        self,
        *,
        name: str,
        class_names: Sequence[str],
        in_chans: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        make_train_set: Callable[[], Dataset],
        make_val_set: Callable[[], Dataset],
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.in_chans = in_chans
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        self._make_train_set = make_train_set
        self._make_val_set = make_val_set
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.collate_fn = collate_fn

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def train_set(self) -> Dataset:
        return self._make_train_set()

    @cached_property
    def val_set(self) -> Dataset:
        return self._make_val_set()

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
        """Shuffled batches of ``batch_size`` (per rank); call ``loader.sampler.set_epoch(epoch)``.

        The sampler is a ``DistributedSampler`` even on one process, so the order is a pure
        function of (seed, epoch) and a resumed run replays it exactly.
        """
        dataset = self.train_set
        self.check_one_batch_per_rank(len(dataset), batch_size, world_size)
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        return self._loader(dataset, batch_size, sampler, drop_last=True)

    def check_one_batch_per_rank(self, images: int, batch_size: int, world_size: int) -> None:
        """Training drops the last partial batch, so fewer images than one batch per rank would
        silently give an empty epoch."""
        per_rank = images // world_size
        if per_rank < batch_size:
            raise DataError(
                f"the {self.name} training set has {images} images, {per_rank} per rank: fewer than one batch "
                f"of {batch_size} per rank; lower data.batch_size or add training images")

    def val_loader(self, batch_size: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Every validation sample exactly once across ranks, in a fixed order, with no padding."""
        dataset = self.val_set
        return self._loader(dataset, batch_size, ShardSampler(len(dataset), rank, world_size), drop_last=False)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and self.persistent_workers,
            drop_last=drop_last,
            collate_fn=self.collate_fn,
        )

    def __repr__(self) -> str:
        return (f"DataModule(name={self.name!r}, num_classes={self.num_classes}, in_chans={self.in_chans}, "
                f"image_size={self.image_size})")


def register_dataset(*names: str):
    """Registers the decorated builder under ``names`` (the values of ``data.name`` it serves)."""
    def register(builder: Callable[[DictConfig], DataModule]) -> Callable[[DictConfig], DataModule]:
        for name in names:
            _BUILDERS[name] = builder
        return builder
    return register


def list_datasets() -> list[str]:
    return sorted(_BUILDERS)


def build_datamodule(cfg: DictConfig) -> DataModule:
    """The DataModule for ``cfg.name`` (a ``data`` config node): cifar10, cifar100, imagenet (any
    ImageFolder tree), digits or fake."""
    if cfg.name not in _BUILDERS:
        raise DataError(f"data.name={cfg.name} is not a dataset; choose one of: {', '.join(list_datasets())}")
    return _BUILDERS[cfg.name](cfg)


# Helpers for the dataset builders.

def one_line(text: object) -> str:
    """``text`` with its line breaks folded: DataError messages are printed as one line."""
    return " ".join(str(text).split())


def default_num_workers() -> int:
    """``data.num_workers=null``: the CPU cores this process may use, shared with the other
    processes of this machine under torchrun, at most 8. More workers than cores only compete
    with the training loop (and PyTorch warns about them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def loader_kwargs(cfg: DictConfig) -> dict[str, Any]:
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    return {"num_workers": workers, "pin_memory": cfg.pin_memory,
            "persistent_workers": cfg.persistent_workers}


def normalization(cfg: DictConfig, in_chans: int, what: str) -> dict[str, list[float]]:
    """``mean`` and ``std`` from the data config, for :class:`DataModule`, after checking there is
    one value per channel: a 3-value mean on 1-channel images would broadcast to 3 channels
    without any error."""
    mean, std = [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    if len(mean) != in_chans or len(std) != in_chans:
        raise DataError(
            f"data.mean has {len(mean)} values and data.std has {len(std)}, but {what} has {in_chans} "
            f"channel(s); give data.mean and data.std {in_chans} value(s) each")
    if min(std) <= 0:
        raise DataError(f"data.std={std} must be positive")
    return {"mean": mean, "std": std}


def check_fixed(cfg: DictConfig, key: str, actual: int, what: str) -> None:
    """Refuses a setting that the data fixes, rather than ignoring the user's value."""
    value = cfg[key] if isinstance(cfg, DictConfig) else getattr(cfg, key)
    if value != actual:
        raise DataError(f"data.{key}={value} does not match {what}, whose {key} is {actual}; set data.{key}={actual}")
