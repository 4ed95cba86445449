"""Datasets, transforms, loaders and samplers: ``build_datamodule(cfg.data)`` is the entry point."""

from rednet.data.datamodule import DATASETS, DataModule, build_datamodule
from rednet.data.samplers import ShardSampler

__all__ = ["DATASETS", "DataModule", "ShardSampler", "build_datamodule"]
