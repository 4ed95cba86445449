"""Datasets, transforms, loaders and samplers: ``build_datamodule(cfg.data)`` is the entry point."""

# Each builder module registers its datasets on import.
from rednet.data import cifar, digits, fake, folder, shards  # noqa: F401
from rednet.data.datamodule import DataModule, build_datamodule, list_datasets, register_dataset
from rednet.data.samplers import ShardSampler

__all__ = ["DataModule", "ShardSampler", "build_datamodule", "list_datasets", "register_dataset"]
