"""ImageNet, or any image-classification tree in the ImageFolder layout:
``root/train/<class>/<image>`` and ``root/val/<class>/<image>``."""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from rednet.data.datamodule import DataModule, loader_kwargs, normalization, one_line, register_dataset
from rednet.data.transforms import IMAGE_ERRORS, MODES, TrainTransform, eval_transform, open_image
from rednet.errors import DataError

MAX_LISTED = 5


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with a fixed class list and a policy for unreadable images.

    ``bad_images="error"`` raises a DataError naming the file; ``"skip"`` warns and returns None,
    which :class:`SkipNone` drops from the batch, so a broken file never yields a wrong label or
    a substitute image.
    """

    def __init__(self, root: str, classes: list[str], mode: str, bad_images: str,
                 transform: Any = None) -> None:
        # Both splits must map a class to the same index, whatever folders each one holds.
        self._fixed_classes = list(classes)
        self.bad_images = bad_images
        super().__init__(root, transform=transform, loader=partial(open_image, mode=mode), allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's listing, in its order, but a symlink loop is an error rather than a walk
        that repeats the same images, or never ends (two links back up double it at every level)."""
        return [(path, class_to_idx[name]) for name in sorted(class_to_idx)
                if os.path.isdir(os.path.join(directory, name))
                for path in list_images(os.path.join(directory, name))]

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            # The transforms decode the file themselves (TrainTransform reads the header first
            # and crops before it resizes); without one, PIL opens it.
            image = self.transform(path) if self.transform is not None else self.loader(path)
        except IMAGE_ERRORS as exc:
            if self.bad_images != "skip":
                raise DataError(f"unreadable image {path} ({type(exc).__name__}: {one_line(exc)}); delete or "
                                f"replace it, or set data.bad_images=skip") from exc
            warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {one_line(exc)})",
                          stacklevel=2)
            return None
        return image, target


class SkipNone:
    """Collates the samples that loaded; an all-bad batch becomes an empty batch of the right shape."""

    def __init__(self, in_chans: int, image_size: int) -> None:
        self.empty_shape = (0, in_chans, image_size, image_size)

    def __call__(self, batch: list) -> Any:
        kept = [sample for sample in batch if sample is not None]
        if kept:
            return default_collate(kept)
        return torch.empty(self.empty_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.long)


def list_images(folder: str) -> list[str]:
    """The image files under ``folder``, through symlinked folders too, sorted as torchvision sorts them."""
    def cannot_list(error: OSError) -> None:
        raise DataError(f"cannot list the image folder {error.filename} ({error.strerror}); fix its permissions "
                        f"or remove it")

    chains = {folder: (os.path.realpath(folder),)}  # each folder's real path and its ancestors'
    walked = []
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=cannot_list):
        for name in dirs:
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            if real in chains[root]:
                raise DataError(f"symlink loop in the image folder: {path} leads back to {real}, which contains "
                                f"it; remove or replace the link")
            chains[path] = (*chains[root], real)
        walked.append((root, files))
    return [os.path.join(root, name) for root, files in sorted(walked) for name in sorted(files)
            if has_file_allowed_extension(name, IMG_EXTENSIONS)]


def class_folders(directory: str) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .thumbnails) are never classes.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def _listed(names: set[str]) -> str:
    shown = sorted(names)[:MAX_LISTED]
    more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(shown) + more


def _load(directory: str, classes: list[str], mode: str, bad_images: str, transform: Any) -> ImageFolder:
    dataset = ImageFolder(directory, classes, mode, bad_images, transform)
    empty = set(classes) - {classes[target] for target in dataset.targets}
    if empty:
        raise DataError(
            f"no images in {directory} for {len(empty)} class(es): {_listed(empty)} (looked for "
            f"{', '.join(IMG_EXTENSIONS)}); add images, or remove these class folders from both train and val")
    return dataset


@register_dataset("imagenet")
def build_imagefolder(cfg: DictConfig) -> DataModule:
    root = str(cfg.root)
    layout = "data.root must hold train/<class>/<image> and val/<class>/<image>"
    if not os.path.isdir(root):
        raise DataError(f"data.root={root} is not a folder; {layout}")
    dirs = {split: os.path.join(root, split) for split in ("train", "val")}
    for split, directory in dirs.items():
        if not os.path.isdir(directory):
            raise DataError(f"the {split} split {directory} is not a folder; {layout}")
    folders = {split: class_folders(directory) for split, directory in dirs.items()}
    for split, names in folders.items():
        if not names:
            raise DataError(f"no class folders in {dirs[split]}; {layout}, one folder per class")
    if folders["train"] != folders["val"]:
        train, val = set(folders["train"]), set(folders["val"])
        parts = [f"only in {dirs[split]}: {_listed(only)}"
                 for split, only in (("train", train - val), ("val", val - train)) if only]
        raise DataError(f"train and val class folders differ ({'; '.join(parts)}); "
                        f"give both splits the same class folders")
    classes = folders["train"]
    if cfg.in_chans not in MODES:
        raise DataError(f"data.in_chans={cfg.in_chans} is not supported for image folders; set 3 (RGB) or 1 (grey)")
    if cfg.bad_images not in ("error", "skip"):
        raise DataError(f"data.bad_images={cfg.bad_images} is not valid; choose one of: error, skip")
    if cfg.val_resize is not None and cfg.val_resize < cfg.image_size:
        raise DataError(f"data.val_resize={cfg.val_resize} is smaller than data.image_size={cfg.image_size}, so the "
                        f"validation crop would be padded; set data.val_resize >= data.image_size")
    size = cfg.image_size
    norm = normalization(cfg, cfg.in_chans, f"the image folder {root} (data.in_chans={cfg.in_chans})")
    mode = MODES[cfg.in_chans]
    # torchvision's RandomResizedCrop + flip and Resize + CenterCrop, on uint8 and faster
    # (rednet/data/transforms.py; docs/benchmarks.md, "Input pipeline").
    train_tf, val_tf = TrainTransform(size, mode), eval_transform(cfg)
    return DataModule(
        name=cfg.name, class_names=classes, in_chans=cfg.in_chans, image_size=size, **norm,
        make_train_set=partial(_load, dirs["train"], classes, mode, cfg.bad_images, train_tf),
        make_val_set=partial(_load, dirs["val"], classes, mode, cfg.bad_images, val_tf),
        collate_fn=SkipNone(cfg.in_chans, size) if cfg.bad_images == "skip" else None,
        **loader_kwargs(cfg),
    )
