"""Images/s of the data=shards train loader against torchvision's reference ImageFolder pipeline, one core.

    python scripts/bench_shards.py [--images 160] [--rounds 3]

The final table (quiet cores; the issue's target is >= 4x the reference at max_side=320, aim 6x)::

    python scripts/bench_shards.py --images 1024 --rounds 5

It writes an ImageFolder tree of JPEGs re-encoded from scikit-learn's two real photographs, at
ImageNet-like sizes (mostly about 500 x 375, some larger) and qualities 75-95, packs it with
pack.py's code at ``max_side=320`` and with the original files (``max_side=null``), and times one
epoch of each loader per round, every loader once per round, ``--rounds`` rounds, in this one
process, with ``torch.set_num_threads(1)`` and ``num_workers=0``. Images/s is the images an epoch
yields over the median epoch time; ratios are against the reference in the same run.

Rows:
- the reference: ``torchvision.datasets.ImageFolder`` with PIL decoding, RandomResizedCrop(224),
  a flip, ToTensor and Normalize (float32), in a shuffled DataLoader;
- data=shards' train loader, uint8 out, at max_side=320 and with the original files: what the
  train transform (``rednet.data.transforms.TrainTransform``) costs on smaller images, plus the
  shards' reading and shuffling;
- reading the max_side=320 shards alone (tar members into memory, no decoding): the container's own cost.

:func:`shard_rows` returns the rows (``HEADER`` is their table head), for scripts/bench_data.py.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet and tests

from rednet.data import build_datamodule  # noqa: E402
from rednet.data.shards import ShardSet, pack  # noqa: E402
from tests.conftest import data_cfg  # noqa: E402
from tests.photos import write_imagefolder  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# (width, height): ImageNet is mostly about 500 x 375 or 500 x 333, in both orientations, with larger pictures too.
HEADER = ["| loader | split | images/s (1 core) | × reference | µs per image |", "|---|---|---:|---:|---:|"]


def reference_epoch(root: Path, batch_size: int) -> Callable[[], int]:
    """One epoch of torchvision's reference ImageNet train pipeline; returns the images it yielded."""
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = DataLoader(datasets.ImageFolder(str(root / "train"), tf), batch_size=batch_size, shuffle=True,
                        num_workers=0, drop_last=True)
    return lambda: sum(len(images) for images, _ in loader)


def shards_epoch(out: Path, batch_size: int) -> Callable[[], int]:
    data = build_datamodule(data_cfg("shards", root=str(out), image_size=224, num_workers=0,
                                     mean=MEAN, std=STD, pin_memory=False))
    loader = data.train_loader(batch_size, seed=0)
    epochs = iter(range(10**9))

    def epoch() -> int:
        loader.set_epoch(next(epochs))
        return sum(len(images) for images, _ in loader)
    return epoch


def reading_epoch(out: Path) -> Callable[[], int]:
    """Every member of the train shards into memory, no decoding."""
    shards = build_datamodule(data_cfg("shards", root=str(out), image_size=224, num_workers=0)).train_set
    assert isinstance(shards, ShardSet)
    pieces = [(i, 0, n) for i, n in enumerate(shards.split.counts)]
    return lambda: sum(1 for _ in shards.samples(pieces))


def shard_rows(tree: Path, work: Path, batch_size: int = 32, rounds: int = 3) -> list[str]:
    """The table's rows for the ImageFolder ``tree`` (train/ and val/), packed into ``work``."""
    torch.set_num_threads(1)
    packed = {}
    for max_side in (320, None):
        out = work / f"shards-{max_side}"
        pack(data_cfg("imagenet", root=str(tree), image_size=224), out, max_side=max_side, num_workers=0)
        packed[max_side] = out
    loaders = {
        "torchvision ImageFolder (reference: PIL, RandomResizedCrop, flip, ToTensor, Normalize)":
            reference_epoch(tree, batch_size),
        "data=shards, max_side=320 (TrainTransform, uint8)": shards_epoch(packed[320], batch_size),
        "data=shards, original files (TrainTransform, uint8)": shards_epoch(packed[None], batch_size),
        "reading the max_side=320 shards alone (no decoding)": reading_epoch(packed[320]),
    }
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    images: dict[str, int] = {}
    for name, epoch in loaders.items():  # a warm-up epoch each: file cache, first-call allocations
        images[name] = epoch()
    for _ in range(rounds):
        for name, epoch in loaders.items():
            start = time.perf_counter()
            assert epoch() == images[name]
            seconds[name].append(time.perf_counter() - start)
    rate = {name: images[name] / statistics.median(times) for name, times in seconds.items()}
    reference = next(iter(rate.values()))
    return [f"| {name} | train | {r:.0f} | {r / reference:.2f} | {1e6 / r:.0f} |" for name, r in rate.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="training images (and a quarter as many for val)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tree = write_imagefolder(Path(work) / "photos", classes=4, train_per_class=args.images // 4,
                                val_per_class=max(1, args.images // 16))
        rows = shard_rows(tree, Path(work), args.batch_size, args.rounds)
    print(f"{platform.processor() or platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"one core (num_workers=0), batch {args.batch_size}, "
          f"{args.images} photographs, median of {args.rounds}\n")
    print("\n".join(HEADER + rows))


if __name__ == "__main__":
    main()
