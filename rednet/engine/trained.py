"""A trained model from a file, checked against the data it is to see.

eval.py, export.py, visualize.py and predict.py take ``ckpt=``: one of our checkpoints, an official
mmcls ``.pth`` (with ``model=`` on the command line), or an exported ``.onnx`` with its sidecar
(:mod:`rednet.deploy.runtime` registers that format). :func:`open_trained` reads any of them once,
:func:`config_for` gives the command its config (the file's model and data, the command line's
keys on top), and :meth:`Trained.model_for` checks the file against the data (a classifier, the
class count, the class names, the image channels) and builds the model. Each check and its message
exist here once, so every command says the same thing about the same file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from rednet.config import TrainConfig, validate
from rednet.errors import CheckpointError, ConfigError
from rednet.io import read_checkpoint
from rednet.models import build_model, load_weights
from rednet.models.weights import state_dict_of

# (model config node, num_classes, in_chans, image_size) -> the model, weights loaded
Builder = Callable[[DictConfig, int, int, int], nn.Module]


@dataclass
class Trained:
    path: Path
    config: dict | None  # the training config the file carries; None for an official release
    num_classes: int | None  # its classifier's outputs; None when it has no classifier
    class_names: list[str] | None  # None when the file does not name them (official releases)
    in_chans: int | None  # None when the file does not say
    build: Builder
    contents: dict[str, Any] = field(repr=False)  # a checkpoint's dict, a sidecar's JSON
    runtime: str = "torch"  # "onnxruntime": one process, on the CPU, fp32

    @property
    def what(self) -> str:
        return f"checkpoint {self.path}" if self.runtime == "torch" else str(self.path)

    def settle_runtime(self, cfg: DictConfig) -> None:
        """An exported file runs in ONNX Runtime, in one process on the CPU in fp32: ``cfg.trainer`` is
        set so, and a DDP launch is refused."""
        if self.runtime == "torch":
            return
        if cfg.trainer.strategy != "single":
            raise ConfigError(f"{self.path} runs in {self.runtime}, in one process; drop "
                              f"trainer={cfg.trainer.strategy}")
        cfg.trainer.device, cfg.trainer.precision = "cpu", "fp32"

    def require_classifier(self, command: str) -> int:
        if self.num_classes is None:
            raise CheckpointError(f"{self.what} has no classifier (head.fc.weight); {command} needs a whole model")
        return self.num_classes

    def check_data(self, class_names: list[str], in_chans: int, data: str, command: str) -> None:
        """Refuses data that the model was not trained for: a model's output i means the class it
        was trained on as class i, so other names, or the same names in another order, would make
        every label silently wrong."""
        count = self.require_classifier(command)
        if count != len(class_names):
            raise CheckpointError(f"{self.what} has {count} classes but {data} has {len(class_names)}; use data "
                                  f"with the same classes")
        check_class_names(self.class_names, class_names, self.what, data)
        if self.in_chans is not None and self.in_chans != in_chans:
            raise CheckpointError(f"{self.what} takes {self.in_chans}-channel images but {data} has {in_chans}; "
                                  f"set data.in_chans={self.in_chans}")

    def model_for(self, cfg: DictConfig, class_names: list[str], in_chans: int, data: str,
                  command: str) -> nn.Module:
        """The model, checked against data of ``class_names`` and ``in_chans``, in eval mode."""
        self.check_data(class_names, in_chans, data, command)
        return self.build(cfg.model, len(class_names), in_chans, cfg.data.image_size).eval()


def check_class_names(trained: list[str] | None, data: list[str], what: str, where: str) -> None:
    """Official mmcls checkpoints carry no names and are not checked; a different count is
    :meth:`Trained.check_data`'s to report, with the counts."""
    if trained is None or list(trained) == list(data) or len(trained) != len(data):
        return
    i = next(i for i, (a, b) in enumerate(zip(trained, data)) if a != b)
    raise CheckpointError(f"{what} was trained on other classes than {where} has: class {i} is {trained[i]!r} there "
                          f"and {data[i]!r} here; use data with the class folders it was trained on")


_FORMATS: dict[str, Callable[[Path], Trained]] = {}


def register_format(*suffixes: str):
    """Registers a reader for files ending in ``suffixes``; anything else is read as a checkpoint."""
    def register(reader: Callable[[Path], Trained]) -> Callable[[Path], Trained]:
        for suffix in suffixes:
            _FORMATS[suffix] = reader
        return reader
    return register


def open_trained(path: str | Path) -> Trained:
    path = Path(path)
    return _FORMATS.get(path.suffix.lower(), read_torch)(path)


def read_torch(path: Path) -> Trained:
    """One of our checkpoints, an official mmcls release or a bare state_dict."""
    ckpt = read_checkpoint(path)
    head = state_dict_of(ckpt).get("head.fc.weight")
    config = ckpt.get("config")
    in_chans = OmegaConf.select(OmegaConf.create(config), "data.in_chans") if config else None

    def build(model_cfg: DictConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
        return load_weights(build_model(model_cfg, num_classes, in_chans, image_size), ckpt, name=str(path))

    return Trained(path, config, None if head is None else int(head.shape[0]), ckpt.get("class_names"), in_chans,
                   build, ckpt)


def config_for(cfg: DictConfig, trained: Trained, overrides: list[str]) -> DictConfig:
    """A command's config for ``trained``: the file's model and data, with what the command line
    names on top, validated.

    ``data=imagenet`` replaces the whole data group; ``data.root=...`` replaces one key. Everything
    else (``trainer.*``: device, precision, batch limits, strategy) is the command's own, never the
    training run's: a run trained with ``trainer.limit_val_batches=2`` is still evaluated on the
    whole validation set. A file without a config (an official mmcls release) needs ``model=`` on
    the command line.
    """
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if trained.config is None:
        if "model" not in keys and not any(k.startswith("experiment") for k in keys):
            raise ConfigError(f"{trained.path} carries no config (an official or weights-only file); name the model "
                              f"and data, e.g. model=rednet26 data=imagenet data.root=path/to/imagenet")
        validate(cfg)
        return cfg
    # Only these two groups: the rest of a file's config may predate today's schema.
    schema = OmegaConf.structured(TrainConfig)
    merged = cfg.copy()
    for group in ("model", "data"):
        if group not in keys:
            merged[group] = OmegaConf.merge(schema[group], trained.config.get(group) or {})
    for key in keys:  # the command line's single keys of those groups, on top of the file's
        if key.split(".")[0] in ("model", "data") and "." in key:
            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    merged.model.pretrained = None  # the file holds the weights
    validate(merged)
    return merged
