"""Tiny datasets written in the real on-disk formats, so that tests go through the real readers.

Images are class-dependent (each class has its own mean colour, plus noise), so a model can
learn them in a few steps. Everything is deterministic in ``seed``.

- ``make_cifar(root, name="cifar10", n_train=50, n_test=20, seed=0) -> str``
  torchvision's layout under ``root`` (``cifar-10-batches-py/`` with data_batch_1..5, test_batch,
  batches.meta; or ``cifar-100-python/`` with train, test, meta). Returns ``str(root)``, the
  value for ``data.root``. Labels cycle through all classes, so every class appears once
  n >= number of classes (10 or 100).
- ``make_imagefolder(root, classes=("cat", "dog", "fox"), n_train=4, n_val=2, size=(40, 48), seed=0) -> str``
  JPEGs of ``size`` = (height, width) in ``root/train/<class>/`` and ``root/val/<class>/``,
  ``n_train`` / ``n_val`` per class. Returns ``str(root)``.
- ``write_corrupt_image(path, kind="garbage") -> str``
  ``"garbage"``: bytes that are not an image; ``"truncated"``: the first half of a valid JPEG.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(rng: np.random.Generator, labels: np.ndarray, num_classes: int, height: int,
                  width: int) -> np.ndarray:
    """(N, H, W, 3) uint8: one mean colour per class plus noise."""
    colours = np.random.default_rng(12345).integers(30, 226, size=(num_classes, 3))  # same for every split
    noise = rng.normal(0, 20, size=(len(labels), height, width, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def _dump(obj: dict, path: str) -> None:
    # Protocol 2 and str keys: what torchvision's reader (pickle.load(encoding="latin1")) sees in the official files.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar(root: str | os.PathLike, name: str = "cifar10", n_train: int = 50, n_test: int = 20,
               seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    num_classes = {"cifar10": 10, "cifar100": 100}[name]

    def batch(n: int, label: str) -> dict:
        labels = _labels(rng, n, num_classes)
        images = _class_images(rng, labels, num_classes, 32, 32)
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows are the R, G, B planes in turn
        entry = {"batch_label": label, "data": data, "filenames": [f"img_{i:05d}.png" for i in range(n)]}
        if name == "cifar10":
            entry["labels"] = labels.tolist()
        else:
            entry["fine_labels"] = labels.tolist()
            entry["coarse_labels"] = (labels // 5).tolist()
        return entry

    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump(batch(len(part), f"training batch {i} of 5"), os.path.join(folder, f"data_batch_{i}"))
        _dump(batch(n_test, "testing batch 1 of 1"), os.path.join(folder, "test_batch"))
        _dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": max(1, n_train // 5), "num_vis": 3072},
              os.path.join(folder, "batches.meta"))
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        _dump(batch(n_train, "training batch 1 of 1"), os.path.join(folder, "train"))
        _dump(batch(n_test, "testing batch 1 of 1"), os.path.join(folder, "test"))
        _dump({"fine_label_names": [f"class_{i:02d}" for i in range(100)],
               "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]}, os.path.join(folder, "meta"))
    return str(root)


def make_imagefolder(root: str | os.PathLike, classes: Sequence[str] = ("cat", "dog", "fox"), n_train: int = 4,
                     n_val: int = 2, size: tuple[int, int] = (40, 48), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    height, width = size
    for split, n in (("train", n_train), ("val", n_val)):
        for index, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            images = _class_images(rng, np.full(n, index), len(classes), height, width)
            for i, image in enumerate(images):
                Image.fromarray(image).save(os.path.join(folder, f"{name}_{i:03d}.jpg"), quality=90)
    return str(root)


def write_corrupt_image(path: str | os.PathLike, kind: str = "garbage") -> str:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    if kind == "garbage":
        data = b"this is not an image\n" * 8
    elif kind == "truncated":
        import io
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="JPEG")
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    else:
        raise ValueError(f"kind={kind!r}: use 'garbage' or 'truncated'")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)
