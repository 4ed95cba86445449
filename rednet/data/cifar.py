"""CIFAR-10 and CIFAR-100 in torchvision's on-disk layout, read whatever the files' checksums."""

from __future__ import annotations

import os
import pickle
import socket
from functools import partial

import numpy as np
from omegaconf import DictConfig
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from rednet.config import DataConfig
from rednet.data.datamodule import DataModule, check_fixed, loader_kwargs, normalize, one_line
from rednet.errors import DataError

# Per blocking socket operation, not for the whole download: a dead network fails instead of hanging.
DOWNLOAD_TIMEOUT_S = 60


class _ReadPresentFiles:
    """Reads the batch files that are present, whatever their md5.

    torchvision refuses any file whose md5 differs from the official release, which rules out
    subsets, re-pickled copies and test fixtures. Checksums are verified only for a download,
    where they catch a truncated or tampered archive.
    """

    title: str

    def _check_integrity(self) -> bool:
        return not missing_files(type(self), self.root)

    def _load_meta(self) -> None:
        self.classes = read_class_names(type(self), self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def download(self) -> None:
        if missing_files(type(self), self.root):
            download(type(self), self.root)


class CIFAR10(_ReadPresentFiles, datasets.CIFAR10):
    title = "CIFAR-10"


class CIFAR100(_ReadPresentFiles, datasets.CIFAR100):
    title = "CIFAR-100"


CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _file_names(cls: type) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def missing_files(cls: type, root: str) -> list[str]:
    folder = os.path.join(root, cls.base_folder)
    return [name for name in _file_names(cls) if not os.path.isfile(os.path.join(folder, name))]


def _unpickle(path: str) -> dict:
    # latin1: the official files were pickled by Python 2.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def read_class_names(cls: type, root: str) -> list[str]:
    path = os.path.join(root, cls.base_folder, cls.meta["filename"])
    try:
        return [str(name) for name in _unpickle(path)[cls.meta["key"]]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{cls.title} meta file {path} is unreadable or lacks '{cls.meta['key']}' ({one_line(exc)}); "
            f"delete {os.path.join(root, cls.base_folder)} and set data.download=true to fetch it again") from exc


def download(cls: type, root: str) -> None:
    """torchvision's download, whose archive md5 is checked, then a check of the extracted files."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # URLError, timeouts, a bad archive: all mean "no usable download"
        raise DataError(
            f"could not download {cls.title} from {cls.url} into {root} ({type(exc).__name__}: {one_line(exc)}); "
            f"check the network, or download and extract {cls.filename} into {root} yourself "
            f"and set data.download=false") from exc
    finally:
        socket.setdefaulttimeout(previous)
    folder = os.path.join(root, cls.base_folder)
    for name, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]:
        if not check_integrity(os.path.join(folder, name), md5):
            raise DataError(f"the downloaded {cls.title} file {os.path.join(folder, name)} is missing or corrupted; "
                            f"delete {folder} and {os.path.join(root, cls.filename)} and try again")


def _not_found(cls: type, root: str, missing: list[str]) -> DataError:
    folder = os.path.join(root, cls.base_folder)
    if os.path.isfile(os.path.join(root, cls.train_list[0][0])):
        return DataError(f"data.root={root} is the {cls.title} folder itself; set data.root to the folder that "
                         f"holds it, {os.path.dirname(os.path.abspath(root))}")
    if os.path.isdir(folder):
        return DataError(f"{cls.title} in {folder} lacks {', '.join(missing)}; set data.download=true to fetch "
                         f"it again, or copy the missing files there")
    return DataError(f"{cls.title} not found in {root} (expected {folder}); set data.download=true or point "
                     f"data.root at the folder that holds {cls.base_folder}")


def _load(cls: type, root: str, train: bool, transform: transforms.Compose, num_classes: int) -> datasets.CIFAR10:
    folder = os.path.join(root, cls.base_folder)
    try:
        dataset = cls(root, train=train, transform=transform, download=False)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{cls.title} files in {folder} are unreadable ({type(exc).__name__}: {one_line(exc)}); "
                        f"delete {folder} and set data.download=true to fetch it again") from exc
    labels = np.asarray(dataset.targets)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{cls.title} labels in {folder} run from {labels.min()} to {labels.max()}, but the meta file "
                        f"names {num_classes} classes; the files do not belong together, fetch them again")
    return dataset


def build_cifar(cfg: DataConfig | DictConfig) -> DataModule:
    cls = CLASSES[cfg.name]
    root = str(cfg.root)
    missing = missing_files(cls, root)
    if missing:
        if not cfg.download:
            raise _not_found(cls, root, missing)
        download(cls, root)
    class_names = read_class_names(cls, root)
    check_fixed(cfg, "in_chans", 3, cls.title)
    check_fixed(cfg, "image_size", 32, cls.title)
    norm = normalize(cfg, 3, cls.title)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.ToTensor(), norm])
    return DataModule(
        name=cfg.name, class_names=class_names, in_chans=3, image_size=32,
        make_train_set=partial(_load, cls, root, True, train_tf, len(class_names)),
        make_val_set=partial(_load, cls, root, False, val_tf, len(class_names)),
        **loader_kwargs(cfg),
    )
