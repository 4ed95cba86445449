"""Images/s of the ImageNet-style train and val loaders, against torchvision's reference, as a markdown table.

    python scripts/bench_data.py                     # every pipeline tried: 1 core and N workers
    python scripts/bench_data.py --settings          # the default pipeline under DataLoader settings
    python scripts/bench_data.py --train-images 32 --val-images 16 --rounds 1 --workers 2   # a quick check

Options: ``--train-images`` / ``--val-images`` (photographs written into train/ and val/, 4 classes;
default 384 and 192), ``--workers`` (N, default: the usable cores), ``--rounds`` (timed epochs per
figure, the median counts; default 3), ``--settings`` (the loader-settings table instead).

The final table (issue 23) comes from the defaults on quiet cores, with ``pip install -e .[fast]``
(simplejpeg) installed::

    python scripts/bench_data.py --rounds 5

It imports nothing from rednet but ``rednet.data.transforms``, and runs on CPUs only.

The photographs are JPEGs re-encoded from scikit-learn's two real photographs at ImageNet-like sizes
and qualities 75-95 (``tests/photos.py``), written once into an ImageFolder tree in a temporary
folder. Each pipeline is the loader of a real ``torchvision.datasets.ImageFolder`` read by a real
``torch.utils.data.DataLoader`` (batch 32, unshuffled), so a figure is a loader's figure, collation
and (with workers) the crossing of shared memory included.

- **1 core**: in this process, ``num_workers=0``, ``torch.set_num_threads(1)``. The pipelines take
  turns epoch by epoch (one warm-up epoch, then 3 rounds) so that a neighbour's load on a shared
  machine falls on all of them alike; the median epoch counts. "CPU time" divides by the process's
  CPU seconds (``time.process_time``), which other processes on a shared machine barely move;
  "wall" by elapsed seconds.
- **N workers**: N = the usable cores, ``persistent_workers=True``, one warm-up epoch, then the
  median of 3 epochs.
- **× ref**: images/s over the reference's in the same column.
- **worker peak RSS**: the most resident memory of any worker (VmHWM in /proc/self/status, read
  inside the worker), and in brackets how much of it the worker added after it started (the rest
  is pages it shares with the main process it was forked from).
- **|Δ| vs ref**: mean and max absolute difference from the reference's pixels (uint8, before
  normalising), over the first 64 images, each drawn with the same seed, so the same crop box and
  flip where the pipeline uses torchvision's sampler in torchvision's order.

``--settings`` times the default train loader under ``num_workers``, ``prefetch_factor`` and
``persistent_workers`` (three epochs each, the first one's start-up counted), to choose them by
measurement. ``pin_memory`` only matters with a GPU, which this script does not use.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torchvision import datasets, transforms
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rednet, and tests/photos.py

import rednet.data.transforms as T  # noqa: E402
from tests.photos import write_imagefolder  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE, RESIZE = 224, 256
DEFAULT_DECODER = "simplejpeg" if T.simplejpeg is not None else "PIL (simplejpeg not installed)"


# ---- the pipelines: each split's loader takes a path and returns the sample ----

def pil_rgb(path: str) -> Image.Image:
    with open(path, "rb") as file:
        return Image.open(file).convert("RGB")


class Reference:
    """torchvision's ImageNet example: PIL, the transforms, ToTensor and Normalize, float32."""

    def __init__(self, train: bool, to_float: bool = True) -> None:
        steps = ([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip()] if train
                 else [transforms.Resize(RESIZE), transforms.CenterCrop(SIZE)])
        tail = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)] if to_float else [transforms.PILToTensor()]
        self.transform = transforms.Compose(steps + tail)

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(pil_rgb(path))


class WithoutSimplejpeg:
    """The default with its fallback decoder (PIL), as where simplejpeg is not installed."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, path: str) -> torch.Tensor:
        saved, T.simplejpeg = T.simplejpeg, None
        try:
            return self.transform(path)
        finally:
            T.simplejpeg = saved


class TorchvisionIO:
    """torchvision.io's libjpeg-turbo decoder (deprecated since 0.29) and transforms.v2 on uint8."""

    def __init__(self, train: bool) -> None:
        self.transform = (v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()]) if train
                          else v2.Compose([v2.Resize(RESIZE, antialias=True), v2.CenterCrop(SIZE)]))

    def __call__(self, path: str) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, once per call
            data = torchvision.io.read_file(path)
            image = torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)
        return self.transform(image).contiguous()


class PilDraft:
    """PIL with ``draft()``: the crop box drawn on the full-size image, the JPEG decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain where the box is at least that many times the output, and the box
    mapped exactly onto the smaller image (PIL's resize takes a fractional box)."""

    def __init__(self, train: bool) -> None:
        self.train = train

    def __call__(self, path: str) -> torch.Tensor:
        with Image.open(path) as image:
            width, height = image.size
            if self.train:
                top, left, h, w = transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                short = min(h, w) / SIZE
            else:
                rh, rw = T.resized_size(height, width, RESIZE)
                top, left = int(round((rh - SIZE) / 2.0)), int(round((rw - SIZE) / 2.0))
                fy, fx = height / rh, width / rw
                top, left, h, w = top * fy, left * fx, SIZE * fy, SIZE * fx
                short = min(height, width) / RESIZE
            factor = next((f for f in (8, 4, 2) if short >= f), 1)
            if factor > 1:
                image.draft("RGB", (width // factor, height // factor))
            image = image.convert("RGB")
            sx, sy = image.width / width, image.height / height
            out = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR,
                               box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        if self.train and torch.rand(1) < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return transforms.functional.pil_to_tensor(out)


class PilReducingGap:
    """PIL decoding and PIL's resize with ``reducing_gap=2``: an integer box-filter reduction first
    where the image shrinks at least 2x twice over, uint8 out."""

    def __init__(self, train: bool) -> None:
        self.train = train

    def __call__(self, path: str) -> torch.Tensor:
        image = pil_rgb(path)
        if self.train:
            top, left, h, w = transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
            out = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h),
                               reducing_gap=2.0)
            if torch.rand(1) < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            rh, rw = T.resized_size(image.height, image.width, RESIZE)
            top, left = int(round((rh - SIZE) / 2.0)), int(round((rw - SIZE) / 2.0))
            out = image.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=2.0)
            out = out.crop((left, top, left + SIZE, top + SIZE))
        return transforms.functional.pil_to_tensor(out)


class PilV2:
    """PIL decoding, then transforms.v2 on the uint8 tensor (torch's antialiased uint8 resize, on the
    whole decoded image). v2's sampler makes the reference's draws, so a seed gives the same box and flip."""

    def __init__(self, train: bool) -> None:
        self.transform = (v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()]) if train
                          else v2.Compose([v2.Resize(RESIZE, antialias=True), v2.CenterCrop(SIZE)]))

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(transforms.functional.pil_to_tensor(pil_rgb(path))).contiguous()


def pipelines() -> dict[str, tuple]:
    """name -> (train loader, val loader); the reference first, the project's default second."""
    return {
        "torchvision reference: PIL, float32 ToTensor + Normalize": (Reference(True), Reference(False)),
        f"**rednet default**: {DEFAULT_DECODER} decode, torch uint8 resize": (T.TrainTransform(SIZE),
                                                                              T.ValTransform(SIZE, RESIZE)),
        "rednet default without simplejpeg (PIL decode)": (WithoutSimplejpeg(T.TrainTransform(SIZE)),
                                                           WithoutSimplejpeg(T.ValTransform(SIZE, RESIZE))),
        "torchvision.io.decode_image + transforms.v2, uint8": (TorchvisionIO(True), TorchvisionIO(False)),
        "PIL decode + transforms.v2 on the uint8 tensor": (PilV2(True), PilV2(False)),
        "PIL decode + PIL resize, uint8 (the first version)": (Reference(True, False), Reference(False, False)),
        "PIL draft() (DCT-domain 1/2-1/8 decode) + PIL resize, uint8": (PilDraft(True), PilDraft(False)),
        "PIL decode + PIL resize reducing_gap=2, uint8": (PilReducingGap(True), PilReducingGap(False)),
    }


# ---- measuring ----

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


_START_RSS = 0


def _remember_start(worker_id: int) -> None:
    global _START_RSS
    _START_RSS = _status_kib("VmRSS")


def collate_with_memory(batch: list) -> tuple:
    """The batch, and (worker id, peak RSS, RSS at the worker's start) of the process that made it."""
    info = get_worker_info()
    return default_collate(batch), (info.id if info else -1, _status_kib("VmHWM"), _START_RSS)


def make_loader(root: Path, split: str, loader, workers: int, **settings) -> DataLoader:
    dataset = datasets.ImageFolder(str(root / split), loader=loader)
    if workers:
        settings = {"persistent_workers": True, "worker_init_fn": _remember_start, **settings}
    return DataLoader(dataset, batch_size=32, shuffle=False, num_workers=workers,
                      collate_fn=collate_with_memory, **settings)


def epoch(loader: DataLoader, clock=time.perf_counter) -> tuple[float, dict]:
    """Seconds for one pass by ``clock``, and each worker's (peak RSS, RSS at start) in KiB."""
    memory = {}
    start = clock()
    for _, (worker, peak, at_start) in loader:
        memory[worker] = (max(peak, memory.get(worker, (0, 0))[0]), at_start)
    return clock() - start, memory


def pixel_difference(paths: list[str], loader, reference) -> tuple[float, int]:
    total, worst = 0.0, 0
    for k, path in enumerate(paths):
        torch.manual_seed(k)
        ours = loader(path)
        torch.manual_seed(k)
        theirs = reference(path)
        if ours.dtype != torch.uint8:  # the reference itself: undo Normalize, back to uint8
            ours = theirs
        diff = (ours.int() - theirs.int()).abs()
        total, worst = total + diff.float().mean().item(), max(worst, int(diff.max()))
    return total / len(paths), worst


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    simplejpeg = T.simplejpeg.__version__ if T.simplejpeg is not None else "not installed"
    return (f"machine: {cpu_name()}, {usable_cores()} usable cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
            f"(libjpeg-turbo {features.version('libjpeg_turbo')}), simplejpeg {simplejpeg}, numpy {np.__version__}")


def bench_pipelines(root: Path, workers: int, rounds: int) -> None:
    table = pipelines()
    names = list(table)
    one_core: dict[tuple[str, str], list[float]] = {}
    one_core_cpu: dict[tuple[str, str], list[float]] = {}
    count = {split: len(datasets.ImageFolder(str(root / split)).samples) for split in ("train", "val")}
    torch.set_num_threads(1)
    for split_index, split in enumerate(("train", "val")):
        loaders = {name: make_loader(root, split, table[name][split_index], 0) for name in names}
        for name in names:
            epoch(loaders[name])  # warm-up: the page cache, lazy imports
        for _ in range(rounds):
            for name in names:
                one_core.setdefault((name, split), []).append(epoch(loaders[name])[0])
                one_core_cpu.setdefault((name, split), []).append(epoch(loaders[name], time.process_time)[0])
    many: dict[tuple[str, str], tuple[float, dict]] = {}
    for split_index, split in enumerate(("train", "val")):
        for name in names:
            loader = make_loader(root, split, table[name][split_index], workers)
            epoch(loader)
            runs = [epoch(loader) for _ in range(rounds)]
            memory = {}
            for _, worker_memory in runs:
                for worker, (peak, at_start) in worker_memory.items():
                    memory[worker] = (max(peak, memory.get(worker, (0, 0))[0]), at_start)
            many[name, split] = statistics.median(seconds for seconds, _ in runs), memory
            del loader
            gc.collect()  # its workers stop now, before the next loader forks copies of it
    paths = {split: [path for path, _ in datasets.ImageFolder(str(root / split)).samples[:64]]
             for split in ("train", "val")}
    reference = {"train": Reference(True, False), "val": Reference(False, False)}

    print(machine())
    print(f"{count['train']} train and {count['val']} val photographs (tests/photos.py); batch 32; median of "
          f"{rounds}; N = {workers} workers. Shared machine: other sessions' load makes these figures noisy.\n")
    print("| loader | pipeline | img/s, 1 core (CPU time) | × ref | img/s, 1 core (wall) | × ref | img/s, N workers "
          "| × ref | worker peak RSS, MiB (+ after start) | mean / max \\|Δ\\| vs ref |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for split_index, split in enumerate(("train", "val")):
        ref_cpu = count[split] / statistics.median(one_core_cpu[names[0], split])
        ref_one = count[split] / statistics.median(one_core[names[0], split])
        ref_many = count[split] / many[names[0], split][0]
        for name in names:
            rate_cpu = count[split] / statistics.median(one_core_cpu[name, split])
            rate_one = count[split] / statistics.median(one_core[name, split])
            seconds, memory = many[name, split]
            rate_many = count[split] / seconds
            peak = max(memory.values())
            mean, worst = pixel_difference(paths[split], table[name][split_index], reference[split])
            print(f"| {split} | {name} | {rate_cpu:.0f} | {rate_cpu / ref_cpu:.2f} | {rate_one:.0f} | "
                  f"{rate_one / ref_one:.2f} | {rate_many:.0f} | "
                  f"{rate_many / ref_many:.2f} | {peak[0] / 1024:.0f} (+{(peak[0] - peak[1]) / 1024:.0f}) | "
                  f"{mean:.3f} / {worst} |")


def bench_settings(root: Path, workers: int, rounds: int) -> None:
    cores = usable_cores()
    grid = [{"num_workers": 0}]
    grid += [{"num_workers": n, "persistent_workers": True, "prefetch_factor": 2} for n in range(1, cores + 2)]
    grid += [{"num_workers": workers, "persistent_workers": False, "prefetch_factor": 2},
             {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 4},
             {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 8}]
    count = len(datasets.ImageFolder(str(root / "train")).samples)
    torch.set_num_threads(1)
    print(machine())
    print(f"the default train loader (rednet TrainTransform) over {count} photographs, batch 32; {rounds} epochs "
          f"each, the first one's start-up (forking the workers) included. Shared machine: noisy figures.\n")
    print("| num_workers | persistent_workers | prefetch_factor | first epoch, s | img/s, median epoch | "
          "img/s, all epochs |")
    print("|---:|---|---:|---:|---:|---:|")
    for settings in grid:
        n = settings["num_workers"]
        with warnings.catch_warnings():
            # One more worker than cores is on the grid on purpose; torch warns about it when the
            # loader is made and at each start.
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            loader = DataLoader(datasets.ImageFolder(str(root / "train"), loader=T.TrainTransform(SIZE)),
                                batch_size=32, collate_fn=collate_with_memory, **settings)
            times = [epoch(loader)[0] for _ in range(rounds)]
        print(f"| {n} | {settings.get('persistent_workers', '-')} | {settings.get('prefetch_factor', '-')} | "
              f"{times[0]:.2f} | {count / statistics.median(times):.0f} | {count * rounds / sum(times):.0f} |")
        del loader
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=384, help="photographs in train/ (4 classes)")
    parser.add_argument("--val-images", type=int, default=192, help="photographs in val/ (4 classes)")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="N (default: usable cores)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per figure; the median counts")
    parser.add_argument("--settings", action="store_true", help="the loader-settings table instead")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        root = write_imagefolder(Path(folder), classes=4, train_per_class=args.train_images // 4,
                                 val_per_class=args.val_images // 4)
        if args.settings:
            bench_settings(root, args.workers, args.rounds)
        else:
            bench_pipelines(root, args.workers, args.rounds)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
