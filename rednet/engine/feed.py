"""uint8 image batches to the device, normalised there: the one place where loader output becomes
the model's input.

Loaders collate uint8 images (a quarter of float32's bytes through the workers' shared memory and
over PCIe). :class:`DeviceFeed` moves each batch to the device and normalises it there, exactly as
torchvision's ``ToTensor`` + ``Normalize`` would have on the CPU (the same operations in the same
order, so the same float32 values). On CUDA the copy runs on a side stream from the loader's pinned
memory, and while the model works on one batch the next one is already on its way (NVIDIA's apex
ImageNet example's ``data_prefetcher``). On the CPU the same code runs in-process, one batch at a
time. :func:`rednet.data.transforms.normalize_batch` is the same arithmetic for images that do not
come from a loader (predict, visualize).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from rednet.data.transforms import normalize
from rednet.errors import DataError


def check_batch(images: torch.Tensor, channels: int, what: str) -> None:
    if images.dtype != torch.uint8 and images.numel():
        raise DataError(f"{what} yields {str(images.dtype).removeprefix('torch.')} images, but batches must be uint8 "
                        f"(0-255), normalised on the device; end its transforms with PILToTensor (or rednet's "
                        f"TrainTransform/ValTransform), not ToTensor + Normalize")
    if images.ndim != 4 or images.shape[1] != channels:
        raise DataError(f"{what} yields images of shape {tuple(images.shape)}, but the normalisation has {channels} "
                        f"channel(s) (data.mean and data.std); give it (batch, {channels}, height, width) batches "
                        f"or {channels} values in data.mean and data.std")


class DeviceFeed:
    """Iterates a loader of ``(uint8 images, target)`` batches as ``(images, target)`` on ``device``,
    the images float32 (or ``dtype``) and normalised, in channels_last memory if asked.

    ``iter()`` calls ``iter(loader)`` at once (which draws the workers' seeds, so a trainer can
    restore its generators after it, as with the loader itself) and fetches nothing until the
    first ``next()``. The next batch is fetched ahead only on CUDA with loader workers: there the
    main process draws no random numbers for it, so exact resume is unaffected.
    """

    def __init__(self, loader: Iterable, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype | None = None, channels_last: bool = False, name: str | None = None) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.dtype, self.channels_last = dtype, channels_last
        self.name = name or f"the dataset {type(getattr(loader, 'dataset', loader)).__name__}"
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(shape).to(self.device)
        self.std = torch.tensor(std, dtype=torch.float32).view(shape).to(self.device)
        self.lookahead = self.device.type == "cuda" and getattr(loader, "num_workers", 0) > 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        return _FeedIterator(self)

    def prepare(self, images: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        """One batch to the device, normalised (on the current stream)."""
        check_batch(images, self.mean.shape[1], self.name)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:  # on uint8, a quarter of the bytes to move
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize(images, self.mean, self.std)
        if self.dtype is not None:
            images = images.to(self.dtype)
        if isinstance(target, torch.Tensor):
            target = target.to(self.device, non_blocking=True)
        return images, target


class _FeedIterator:
    def __init__(self, feed: DeviceFeed) -> None:
        self.feed = feed
        self.batches = iter(feed.loader)
        self.stream = torch.cuda.Stream(feed.device) if feed.device.type == "cuda" else None
        self.pending: tuple | None = None  # the next batch, already on its way
        self.done = False

    def __iter__(self) -> _FeedIterator:
        return self

    def _send(self) -> tuple | None:
        """The next batch from the loader, its copy and normalisation queued on the side stream."""
        try:
            images, target = next(self.batches)
        except StopIteration:
            self.done = True
            return None
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return self.feed.prepare(images, target)

    def __next__(self) -> tuple[torch.Tensor, Any]:
        batch, self.pending = self.pending, None
        if batch is None and not self.done:
            batch = self._send()
        if batch is None:
            raise StopIteration
        if self.stream is not None:
            # The compute stream waits for this batch's copy and normalisation, and the allocator
            # keeps the batch's memory until that stream is done with it, not the side stream.
            current = torch.cuda.current_stream(self.feed.device)
            current.wait_stream(self.stream)
            for tensor in batch:
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(current)
        if self.feed.lookahead and not self.done:
            self.pending = self._send()  # queued after the wait above, so nothing waits on it yet
        return batch
