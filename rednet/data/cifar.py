"""CIFAR-10 and CIFAR-100 in torchvision's on-disk layout, read whatever the files' checksums."""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from rednet.data import safe_pickle
from rednet.data.datamodule import DataModule, check_fixed, loader_kwargs, normalization, one_line, register_dataset
from rednet.errors import DataError

# Per blocking socket operation, not for the whole download: a dead network fails instead of hanging.
DOWNLOAD_TIMEOUT_S = 60
# The largest official file, CIFAR-100's train, is 155 MB: a "batch" far larger is refused unread.
MAX_FILE_BYTES = 512 * 2**20


class _ReadPresentFiles:
    """Reads the batch files that are present, whatever their md5, through a restricted unpickler.

    torchvision refuses any file whose md5 differs from the official release, which rules out
    subsets, re-pickled copies and test fixtures. Checksums are verified only for a download,
    where they catch a truncated or tampered archive. Without them a batch file is untrusted
    input, so it is never given to ``pickle.load`` (which torchvision's own ``__init__`` does):
    :func:`read_batch` reads it.
    """

    title: str

    def __init__(self, root: str, train: bool, classes: list[str], transform: Any = None) -> None:
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        data, targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            images, labels = read_batch(type(self), os.path.join(self.root, self.base_folder, name))
            data.append(images)
            targets.extend(labels)
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # HWC, as torchvision's __getitem__ expects
        self.targets = targets
        self.classes = list(classes)  # read once by build_cifar, not again for each split
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


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


def _refetch(path: str) -> str:
    return f"delete {os.path.dirname(path)} and set data.download=true to fetch the official files"


def _unpickle(cls: type, path: str) -> dict:
    """The dict in a CIFAR file, read so that the file can neither run code nor fill memory."""
    refetch = _refetch(path)
    try:
        entry = safe_pickle.load(path, MAX_FILE_BYTES)
    except safe_pickle.RefusedPickle as exc:
        raise DataError(f"refusing to load the {cls.title} file {path}: {one_line(exc)}; {refetch}") from None
    except OSError as exc:
        raise DataError(f"cannot read the {cls.title} file {path} ({type(exc).__name__}: {one_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001  (a damaged pickle raises anything: EOFError, KeyError, ...)
        raise DataError(f"{cls.title} files in {os.path.dirname(path)} are unreadable: {os.path.basename(path)} is "
                        f"truncated or not a CIFAR pickle ({type(exc).__name__}: {one_line(exc)}); {refetch}") from None
    if not isinstance(entry, dict):
        raise DataError(f"the {cls.title} file {path} holds a {type(entry).__name__}, not a dict; {refetch}")
    return entry


def read_batch(cls: type, path: str) -> tuple[np.ndarray, list[int]]:
    """The (N, 3, 32, 32) uint8 images and N labels of one batch file."""
    entry = _unpickle(cls, path)
    key = "labels" if "labels" in entry else "fine_labels"
    data, labels = entry.get("data"), entry.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"the {cls.title} file {path} has 'data' of {what}, not uint8 rows of 3 x 32 x 32 pixels; "
                        f"{_refetch(path)}")
    images = data.reshape(-1, 3, 32, 32)
    labels = np.asarray(labels if labels is not None else [None])
    if labels.ndim != 1 or len(labels) != len(images) or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"the {cls.title} file {path} has {len(images)} images but its '{key}' are not "
                        f"{len(images)} integers; {_refetch(path)}")
    return images, labels.tolist()


def read_class_names(cls: type, root: str) -> list[str]:
    path = os.path.join(root, cls.base_folder, cls.meta["filename"])
    names = _unpickle(cls, path).get(cls.meta["key"])
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, (str, bytes)) for name in names):
        raise DataError(f"{cls.title} meta file {path} lacks a list of class names under '{cls.meta['key']}'; "
                        f"{_refetch(path)}")
    return [name if isinstance(name, str) else name.decode("latin1") for name in names]


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


def _load(cls: type, root: str, train: bool, transform: transforms.Compose, classes: list[str]) -> datasets.CIFAR10:
    folder = os.path.join(root, cls.base_folder)
    dataset = cls(root, train=train, classes=classes, transform=transform)
    num_classes = len(classes)
    labels = np.asarray(dataset.targets)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{cls.title} labels in {folder} run from {labels.min()} to {labels.max()}, but the meta file "
                        f"names {num_classes} classes; the files do not belong together, fetch them again")
    return dataset


@register_dataset("cifar10", "cifar100")
def build_cifar(cfg: DictConfig) -> DataModule:
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
    norm = normalization(cfg, 3, cls.title)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    val_tf = transforms.PILToTensor()
    return DataModule(
        name=cfg.name, class_names=class_names, in_chans=3, image_size=32, **norm,
        make_train_set=partial(_load, cls, root, True, train_tf, class_names),
        make_val_set=partial(_load, cls, root, False, val_tf, class_names),
        **loader_kwargs(cfg),
    )
