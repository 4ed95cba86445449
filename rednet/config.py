"""Schemas for every config group, registered with Hydra's ConfigStore, and the checks of values.

``configs/train.yaml`` and ``configs/eval.yaml`` start from ``train_schema``; every group file
merges into its typed node, so Hydra rejects an unknown key, a value of the wrong type or a choice
outside an Enum while it composes, before any work starts. Value checks that a type cannot express
(a positive lr, a registered model or dataset) live in :func:`validate`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rednet.data import list_datasets
from rednet.errors import ConfigError
from rednet.models import list_models
from rednet.models.resnet import STEM_INVOLUTION_CHANNELS


class Choice(str, Enum):
    """A closed set of values: the schema refuses any other while Hydra composes. A str, so that
    ``cfg.trainer.device == "cpu"`` holds and messages print the value."""

    def __str__(self) -> str:
        return self.value


class BadImages(Choice):
    error = "error"
    skip = "skip"


class Optimizer(Choice):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(Choice):
    cosine = "cosine"
    step = "step"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Strategy(Choice):
    single = "single"
    ddp = "ddp"


class Progress(Choice):
    auto = "auto"
    bar = "bar"
    none = "none"


@dataclass
class ModelConfig:
    name: str = MISSING  # a name from rednet.models.list_models()
    kernel_size: int = 7
    group_channels: int = 16
    reduction_ratio: int = 4
    zero_init_residual: bool = True
    drop_path_rate: float = 0.0
    # RedNet: each involution and its kernel generator's second 1x1 conv as one Triton operator that
    # never stores the kernel map (same weights). Off by default: unmeasured on the GPU (README Speed).
    fused_generator: bool = False
    # null: the CIFAR stem (no downsampling) for images of 64 px or less, the ImageNet stem otherwise.
    cifar_stem: Optional[bool] = None
    # Initial weights: one of our checkpoints or an official mmcls release.
    pretrained: Optional[str] = None
    # With pretrained: ignore its classifier, for fine-tuning on another label set.
    drop_head: bool = False


@dataclass
class DataConfig:
    name: str = MISSING  # a name from rednet.data.list_datasets(): cifar10, cifar100, digits, fake, imagenet, shards
    root: str = "data"
    download: bool = True
    batch_size: int = 128  # the global batch: split across ranks under DDP
    num_workers: Optional[int] = None  # null: one per usable CPU core, at most 8
    pin_memory: bool = True
    persistent_workers: bool = True
    image_size: int = 32  # training crop (and the validation crop of imagenet)
    val_resize: Optional[int] = None  # shorter side before the validation centre crop; null: image_size
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    in_chans: int = 3
    num_classes: Optional[int] = None  # fake only; every other dataset knows its classes
    train_size: int = 1000  # fake only
    val_size: int = 200  # fake only
    bad_images: BadImages = BadImages.error  # imagenet/ImageFolder: error | skip unreadable images
    seed: int = 0  # digits: the fixed stratified split
    shuffle_buffer: int = 1000  # shards: samples (encoded) each loader worker holds to shuffle; 0: none


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.sgd
    lr: float = 0.1
    # When set, lr is the rate at this global batch and is scaled linearly to data.batch_size.
    base_batch_size: Optional[int] = None
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    # Exempt BatchNorm and bias parameters from weight decay.
    no_decay_norm_bias: bool = False


@dataclass
class SchedConfig:
    name: Schedule = Schedule.cosine
    # linear warmup, in epochs (fractions allowed): the same schedule at any batch size
    warmup_epochs: float = 0.0
    warmup_ratio: float = 0.1  # warmup starts at lr * warmup_ratio
    min_lr: float = 0.0  # cosine: the final lr
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # step: epochs
    gamma: float = 0.1  # step: factor at every milestone


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    device: Device = Device.auto  # auto: the GPU when there is one
    precision: Precision = Precision.auto  # auto: bf16 (fp16 on older GPUs) on CUDA, fp32 on the CPU
    seed: int = 42
    deterministic: bool = False
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max global grad norm
    ema: bool = False
    ema_decay: float = 0.9998
    # null: what measured faster on the device (rednet.engine.precision.AUTO); true | false to choose
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    strategy: Strategy = Strategy.single  # ddp: launch with torchrun
    sync_batchnorm: bool = False  # ddp: convert BatchNorm to SyncBatchNorm
    ddp_timeout_s: int = 1800  # ddp: the longest any process waits for the others (a dead or hung one)
    limit_train_batches: Optional[int] = None  # for smoke tests and profiling
    limit_val_batches: Optional[int] = None
    save_every_n_steps: int = 0  # also write last.pt every N steps (0: once per epoch)
    max_bad_steps: int = 0  # skip up to N steps with a non-finite loss before stopping
    progress: Progress = Progress.auto  # auto: a bar on a terminal
    log_kernels: bool = False  # TensorBoard: kernel heat-maps of a few validation images at every validation


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # null | auto (the newest last.pt under outputs/) | if_exists (this run folder's last.pt, if any) | a path
    resume: Optional[str] = None
    ckpt: Optional[str] = None  # eval.py: the checkpoint to evaluate
    experiment: Optional[str] = None  # the recipe's name, for the record
    # What train.py returns to a sweeper (Optuna's): a key of metrics.json, one of METRICS.
    optimized_metric: str = "best.acc1"


@dataclass
class ExportConfig(TrainConfig):
    out: Optional[str] = None  # export.py: the .onnx to write (null: model.onnx beside the checkpoint)


@dataclass
class VisualizeConfig(TrainConfig):
    """visualize.py: the model and data come from the checkpoint (``ckpt``), as in eval.py."""

    images: Optional[str] = None  # an image file or a folder of them; null: the first validation images
    num_images: int = 8  # at most this many images are drawn
    layers: Any = None  # an involution layer's block name (layer1.2) or a list of them; null: each stage's last
    point: Optional[list[int]] = None  # [y, x] in image pixels for the kernels at one point; null: the centre


@dataclass
class PackConfig:
    """pack.py: the ImageFolder tree of ``data`` (data=imagenet data.root=SRC) into tar shards in ``out``."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str = MISSING  # the folder to write the shards into (data.root of data=shards)
    max_side: Optional[int] = None  # re-encode images whose longer side is larger to this side; null: keep the files
    quality: int = 90  # JPEG quality of re-encoded images
    shard_samples: int = 1000  # images per shard


@dataclass
class PredictConfig(TrainConfig):
    """predict.py: the model and data (the eval transform, mean and std) come from the checkpoint."""

    images: Any = MISSING  # an image file, a folder (recursively), a glob, or a list of them
    topk: Optional[int] = None  # classes listed per image; null: 5, or every class when there are fewer
    show: bool = False  # also draw predictions.png: the images with their top-1 class
    bad_images: BadImages = BadImages.skip  # an unreadable image: skip (listed and counted) | error


# Each command's config (configs/<name>.yaml) and its schema; eval.py's is the training schema.
SCHEMAS = {"train": TrainConfig, "export": ExportConfig, "visualize": VisualizeConfig, "predict": PredictConfig,
           "pack": PackConfig}


def register_configs() -> None:
    for name, schema in SCHEMAS.items():
        ConfigStore.instance().store(name=f"{name}_schema", node=schema)


def schema_keys(schema: type = TrainConfig) -> list[str]:
    """Every key of ``schema``, dotted: ``trainer``, ``trainer.max_epochs``, ..."""
    def walk(node, prefix: str):
        for key in node:
            path = f"{prefix}{key}"
            yield path
            if is_dataclass(OmegaConf.get_type(node, key)):
                yield from walk(node[key], f"{path}.")
    return list(walk(OmegaConf.structured(schema), ""))


def did_you_mean(key: str, schema: type = TrainConfig) -> str:
    """``"; did you mean trainer.max_epochs?"`` for the schema key closest to ``key``, or ``""``.
    A key's siblings come first; then the same name under another group (``+max_epochs=5``)."""
    keys = schema_keys(schema)
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    anywhere = {k.rpartition(".")[2]: k for k in reversed(keys)}
    for names, cutoff in ((siblings, 0.6), (anywhere, 0.75)):
        close = difflib.get_close_matches(name, list(names), n=1, cutoff=cutoff)
        if close and names[close[0]] != key:
            return f"; did you mean {names[close[0]]}?"
    return ""


# The scalars of metrics.json a sweeper can optimise (val_ema.* needs trainer.ema=true).
METRICS = ["best.acc1", "val.acc1", "val.acc5", "val.loss", "train.loss", "train.acc1", "train.images_per_s",
           "val_ema.acc1", "val_ema.acc5", "val_ema.loss"]


def validate(cfg: DictConfig | Any) -> None:
    """Checks values that the schema's types cannot, raising ConfigError naming key and fix. (Keys
    the schema lacks, which ``+key=`` can add, are refused on the command line: cli.check_added_keys.)"""
    if cfg.model.name not in list_models():
        raise ConfigError(f"model={cfg.model.name} is not a model; choose one of: {', '.join(list_models())}")
    if cfg.data.name not in list_datasets():
        raise ConfigError(f"data.name={cfg.data.name} is not valid; choose one of: {', '.join(list_datasets())}")
    positive = {"optim.lr": cfg.optim.lr, "trainer.max_epochs": cfg.trainer.max_epochs,
                "trainer.ddp_timeout_s": cfg.trainer.ddp_timeout_s,
                "data.batch_size": cfg.data.batch_size, "data.image_size": cfg.data.image_size}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    nonneg = {"data.num_workers": cfg.data.num_workers or 0, "trainer.label_smoothing": cfg.trainer.label_smoothing,
              "optim.weight_decay": cfg.optim.weight_decay, "sched.warmup_epochs": cfg.sched.warmup_epochs,
              "trainer.save_every_n_steps": cfg.trainer.save_every_n_steps,
              "trainer.max_bad_steps": cfg.trainer.max_bad_steps}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    if not 0 <= cfg.trainer.label_smoothing < 1:
        raise ConfigError(f"trainer.label_smoothing={cfg.trainer.label_smoothing} must be in [0, 1)")
    if cfg.trainer.grad_clip is not None and cfg.trainer.grad_clip <= 0:
        raise ConfigError(f"trainer.grad_clip={cfg.trainer.grad_clip} must be positive, or null to turn it off")
    if cfg.data.name == "fake" and not (cfg.data.num_classes or 0) >= 1:
        raise ConfigError(f"data=fake needs data.num_classes of at least 1, e.g. data.num_classes=10 "
                          f"(got {cfg.data.num_classes})")
    optional_positive = {"optim.base_batch_size": cfg.optim.base_batch_size,
                         "trainer.limit_train_batches": cfg.trainer.limit_train_batches,
                         "trainer.limit_val_batches": cfg.trainer.limit_val_batches}
    for key, value in optional_positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1, or null to turn it off")
    fractions = {"sched.warmup_ratio": (cfg.sched.warmup_ratio, "[0, 1]", 0 <= cfg.sched.warmup_ratio <= 1),
                 "trainer.ema_decay": (cfg.trainer.ema_decay, "[0, 1)", 0 <= cfg.trainer.ema_decay < 1),
                 "model.drop_path_rate": (cfg.model.drop_path_rate, "[0, 1)", 0 <= cfg.model.drop_path_rate < 1)}
    for key, (value, interval, ok) in fractions.items():
        if not ok:
            raise ConfigError(f"{key}={value} must be in {interval}")
    if cfg.sched.min_lr < 0:
        raise ConfigError(f"sched.min_lr={cfg.sched.min_lr} must not be negative")
    if not 0 < cfg.sched.gamma <= 1:
        raise ConfigError(f"sched.gamma={cfg.sched.gamma} must be in (0, 1]: the factor the lr is multiplied by "
                          f"at every milestone")
    if list(cfg.sched.milestones) != sorted(set(cfg.sched.milestones)):
        raise ConfigError(f"sched.milestones={list(cfg.sched.milestones)} must be increasing epochs, e.g. [30, 60, 80]")
    if cfg.optimized_metric not in METRICS:
        raise ConfigError(f"optimized_metric={cfg.optimized_metric} is not a metric of the run; choose one of: "
                          f"{', '.join(METRICS)}")
    if cfg.optimized_metric.startswith("val_ema.") and not cfg.trainer.ema:
        raise ConfigError(f"optimized_metric={cfg.optimized_metric} needs the EMA of the weights: add "
                          f"trainer.ema=true, "
                          f"or optimise val.{cfg.optimized_metric.split('.')[1]}")
    _validate_involution(cfg.model)
    out = cfg.get("out")
    if out is not None and not str(out).endswith(".onnx"):
        raise ConfigError(f"out={out} must be a path ending in .onnx (the sidecar goes beside it, ending in .json)")
    if cfg.trainer.log_kernels and not cfg.model.name.startswith("rednet"):
        raise ConfigError(f"trainer.log_kernels=true draws involution kernels, and model={cfg.model.name} has none; "
                          f"use a RedNet model or trainer.log_kernels=false")


def validate_pack(cfg: DictConfig) -> None:
    """pack.py's config: the dataset; pack() checks its own values."""
    if cfg.data.name not in list_datasets():
        raise ConfigError(f"data.name={cfg.data.name} is not valid; choose one of: {', '.join(list_datasets())}")


def _validate_involution(m) -> None:
    """The involution settings must fit every involution of the model, the narrowest being the stem's."""
    width = STEM_INVOLUTION_CHANNELS
    if not m.name.startswith("rednet"):
        if m.fused_generator:
            raise ConfigError(f"model.fused_generator=true fuses RedNet's involutions, and {m.name} has none; "
                              f"drop the override or choose a rednet model")
        return  # the ResNet baselines have no involution
    if m.kernel_size < 1 or m.kernel_size % 2 == 0:
        raise ConfigError(f"model.kernel_size={m.kernel_size} must be odd and positive (the involution's padding "
                          f"is symmetric), e.g. 7")
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    if m.group_channels not in divisors:
        raise ConfigError(f"model.group_channels={m.group_channels} must divide the {width} channels of the stem's "
                          f"involution; choose one of: {', '.join(map(str, divisors))}")
    if not 1 <= m.reduction_ratio <= width:
        raise ConfigError(f"model.reduction_ratio={m.reduction_ratio} leaves the stem's {width}-channel kernel "
                          f"generator with no channels; choose one from 1 to {width}")
