"""Packed shards: an ImageFolder tree as tar files (``python pack.py``), and ``data=shards``, which trains from them.

On a cluster or a slow filesystem, millions of small image files cost a metadata lookup and a seek
each; a few thousand tar files of a thousand images each are read front to back.

Layout (``out=`` of pack.py, ``data.root`` of data=shards)::

    index.json              written last: the classes, and per split its shards, their sample
                            counts and sizes in bytes
    pack.json               written first: what is being packed (to resume an interrupted packing)
    train-000000.tar ...    samples ``<key>.cls`` (the class index, in ASCII) and ``<key>.<ext>``
    val-000000.tar ...      (the image file's bytes); keys are 9 digits, increasing within a shard

Packing. pack.py lists the tree as data=imagenet does (the same checks and messages), then writes
the shards with WebDataset's ``TarWriter``, each through :func:`rednet.io.atomic_open`: a shard
file that exists is whole. The training images are packed in a fixed random order, so that every
shard holds a mix of classes; the validation images in the folder's order. ``max_side=N``
re-encodes an image whose longer side exceeds N to exactly N (JPEG at ``quality``), as FFCV's
``max_res`` does; smaller images, and every image with ``max_side=null``, keep their file's bytes.
Every image is decoded once while packing: an unreadable one stops it (``data.bad_images=error``)
or is left out and counted (``skip``). Running the same command again after an interruption keeps
the shards already written and writes the rest; a folder holding another packing is refused.

Reading. Shards are untrusted input, read with Python's ``tarfile``: nothing is extracted to
disk, so a member's name cannot write anywhere; a member must be a regular file named
``<9 digits>.<ext>`` and at most :data:`MAX_MEMBER_BYTES` (read into memory only below that);
a label must be an integer in [0, number of classes) or the shard is refused. WebDataset's own
reader is not used: it reads every member whole whatever its size, it opens ``pipe:`` names as
shell commands (shard names come from index.json), and it cannot skip the part of a shard that
another reader has.

One epoch, for rank r of ``world`` ranks, each with k loader workers (k = 1 without workers):

- The shards are put in an order drawn from (seed, epoch); validation keeps the packed order.
  Those shards' samples, end to end, are the epoch's stream of N samples.
- Training: every rank gets the same number of batches, B = N // (world * batch), so that DDP
  never waits on a rank that ran out. Rank r reads positions [r*B*batch, (r+1)*B*batch) of the
  stream. The last N - world*B*batch samples (fewer than one global batch) are not trained on in
  that epoch: the end of the epoch's last shard(s), a different part of the data every epoch as
  the shard order changes. Every other sample is trained on exactly once.
- Validation: rank r reads positions [N*r//world, N*(r+1)//world): every sample exactly once
  across ranks, none dropped, none repeated (ranks differ by at most one sample).
- A rank's positions are whole shards, except at most one shard at each end, which the
  neighbouring rank reads the other part of (it seeks past the members it does not read).
  Its shards and parts are dealt to its k workers in turn: workers read disjoint shards.
- Each worker shuffles its samples with a buffer of ``data.shuffle_buffer`` encoded samples
  (each new sample replaces a random one of the buffer, which is emitted), drawn from its own
  generator seeded by (seed, epoch, rank, worker); images are decoded after the buffer.
- Workers send whole batches; each worker's last, partial batch is merged with the others' in
  the loading process, so a rank yields exactly B batches (training) whatever k is.

Resuming mid-epoch. The trainer's checkpoint holds the epoch and the batches this rank had
trained in it; on resume it calls ``loader.set_epoch(epoch)`` then ``loader.skip_next(n)``, n
being those batches times the per-rank batch. The granularity is one sample, finer than a shard.
The epoch's order is a pure function of (the index, seed, epoch, world size, k, batch,
data.shuffle_buffer), so the loader recomputes how many samples each worker had delivered
(:func:`delivered` replays the DataLoader's turn-taking over the workers and the merge of their
last batches) and each worker starts after them: a shard all of whose samples it had delivered is
not opened; in a shard it had partly delivered, the delivered samples' headers are read but their
image bytes are seeked past, never read or decoded. Nothing is read to count or to replay.

Exact, when the resumed run has the same packed folder, seed, world size, data.num_workers,
data.batch_size and data.shuffle_buffer (the loader cannot check these; the config saved with
the checkpoint is what keeps them equal):

- which samples the epoch trains on: each of the epoch's samples exactly once, none repeated and
  none lost across the interruption, and the same samples left out at the epoch's end (training);
- the number of batches of the epoch, the same on every rank;
- with ``num_workers=0``: the order of the samples and the batches themselves, and their
  augmentations where the trainer restores torch's generator after the loader starts (the shard
  order and the buffer use their own numpy generators, never torch's);
- every later epoch's shard order, buffer order and batches (they depend on the epoch's number,
  not on the interruption); its augmentations only as far as torch's generator was restored.

Not exact:

- with workers, how the remaining samples are grouped into batches and in what order: each
  worker restarts its batches where it stopped, and the workers' turns restart at worker 0;
- with workers, the augmentations of the remaining samples: workers draw new seeds when they
  start, as with data=imagenet;
- anything that depends on the previous point (batch statistics, the exact weights after the
  epoch): a resumed run with workers is statistically, not bitwise, the run that was not stopped;
- with another world size, number of workers, batch size, seed or buffer, the epoch is split
  differently: the resumed epoch is still each rank's disjoint part of the stream, but samples of
  the interrupted epoch may be trained twice or not at all in that one epoch;
- validation is not resumed: an interrupted validation runs again from its start;
- an unreadable image skipped with ``data.bad_images=skip`` still counts as a delivered sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from rednet.commands import command_line
from rednet.data.datamodule import (
    DataModule,
    default_num_workers,
    loader_kwargs,
    normalization,
    one_line,
    register_dataset,
)
from rednet.data.folder import build_imagefolder
from rednet.data.transforms import IMAGE_ERRORS, MODES, TrainTransform, ValTransform, eval_transform, open_image
from rednet.errors import ConfigError, DataError
from rednet.io import atomic_open, write_json

FORMAT, VERSION = "rednet-shards", 1
INDEX, PLAN = "index.json", "pack.json"
SPLITS = ("train", "val")
# The largest image a shard member may be (and pack.py packs): ImageNet's largest file is about
# 15 MB. A member claiming more is refused before it is read.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_INDEX_BYTES = 64 * 2**20
MEMBER_NAME = re.compile(r"(\d{9})\.([a-z0-9]{1,8})")
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
LABEL = re.compile(rb"\d{1,9}")
PACK_ORDER_SEED = 0  # the fixed order of the training images in the shards
MAX_LISTED = 5
REPACK = "re-pack it with pack.py"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _listed(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


# -- reading one shard -------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: int
    label: int
    image: bytes | None  # None where the reader was asked to skip its data
    where: str  # "<shard>:<member>", for messages


def read_shard(path: Path, num_classes: int, wanted: Callable[[int], bool] = lambda j: True) -> Iterator[Sample]:
    """The samples of the shard at ``path``, in order; the image bytes of sample j only where
    ``wanted(j)`` (the others' data is seeked past, not read). Raises DataError, naming the shard,
    for anything that is not a well-formed shard of ``num_classes`` classes."""
    def refuse(reason: str) -> DataError:
        return DataError(f"shard {path} is not a valid RedNet shard: {reason}; {REPACK}")

    def finish(key: int, parts: dict[str, bytes | None]) -> Sample:
        images = [ext for ext in parts if ext != "cls"]
        if "cls" not in parts or len(images) != 1:
            raise refuse(f"sample {key:09d} has members {', '.join(sorted(parts))}, not one image and one .cls")
        text = parts["cls"]
        if not LABEL.fullmatch(text):
            raise refuse(f"{key:09d}.cls holds {text[:20]!r}, not a class index")
        label = int(text)
        if label >= num_classes:
            raise refuse(f"{key:09d}.cls is class {label}, but the index has {num_classes} classes")
        return Sample(key, label, parts[images[0]], f"{path.name}:{key:09d}.{images[0]}")

    try:
        with tarfile.open(path, "r:") as tar:
            key, parts, j = -1, {}, 0
            for member in iter(tar.next, None):
                match = MEMBER_NAME.fullmatch(member.name)
                if not member.isreg() or match is None:
                    what = "a regular file" if member.isreg() else "not a regular file"
                    raise refuse(f"member {member.name!r} is {what}; members are <9 digits>.<extension> files")
                if member.size > MAX_MEMBER_BYTES:
                    raise refuse(f"member {member.name} is {member.size} bytes, more than the {MAX_MEMBER_BYTES} "
                                 f"allowed")
                member_key, ext = int(match.group(1)), match.group(2)
                if member_key != key:
                    if parts:
                        yield finish(key, parts)
                        j += 1
                    if member_key < key:
                        raise refuse(f"key {member_key:09d} comes after {key:09d}: keys must increase")
                    key, parts = member_key, {}
                if ext in parts:
                    raise refuse(f"member {member.name} appears twice")
                read = ext == "cls" or wanted(j)
                if ext == "cls" and member.size > 16:
                    raise refuse(f"{member.name} is {member.size} bytes, too long for a class index")
                parts[ext] = tar.extractfile(member).read() if read else None
            if parts:
                yield finish(key, parts)
    except tarfile.TarError as e:
        raise DataError(f"shard {path} is truncated or damaged ({one_line(e) or type(e).__name__}); copy it again "
                        f"or {REPACK}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror or e}); check the file") from None


# -- the index ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    classes: list[str]
    shards: list[str]
    counts: list[int]
    sizes: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def read_index(root: Path) -> dict[str, Split]:
    """The splits of the packed folder ``root``, after checking that every shard it lists is there
    with the size the index gives (a cut-off copy is caught here, before training starts)."""
    hint = "pack an ImageFolder tree there with: python pack.py data=imagenet data.root=SRC out=DIR"
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder; {hint}")
    path = root / INDEX
    if not path.is_file():
        found = sorted(p.name for p in root.glob("*.tar"))
        state = (f"it has {len(found)} shard(s) ({_listed(found)}) but no {INDEX}: an interrupted packing, which "
                 f"re-running the same pack.py command completes" if found else f"it has no shards and no {INDEX}")
        raise DataError(f"no packed shards in data.root={root}: {state}; {hint}")
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise DataError(f"{path} is {path.stat().st_size} bytes, too large for a shard index; {REPACK}")

    def bad(reason: str) -> DataError:
        return DataError(f"{path} is not a RedNet shard index ({reason}); {REPACK}")

    try:
        index = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON: {one_line(e)}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise bad(f"no \"format\": \"{FORMAT}\"")
    if index.get("version") != VERSION:
        raise bad(f"version {index.get('version')!r}, this RedNet reads version {VERSION}")
    splits = {}
    for name in SPLITS:
        entry = (index.get("splits") or {}).get(name)
        if not isinstance(entry, dict):
            raise bad(f"no {name} split")
        classes, shards = entry.get("classes"), entry.get("shards")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
                and len(set(classes)) == len(classes)):
            raise bad(f"the {name} classes are not a list of distinct names")
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise bad(f"the {name} shards are not a list")
        names = [s.get("name") for s in shards]
        counts, sizes = [s.get("samples") for s in shards], [s.get("bytes") for s in shards]
        if not all(isinstance(n, str) and SHARD_NAME.fullmatch(n) and n.startswith(name + "-") for n in names):
            raise bad(f"a {name} shard name is not {name}-<6 digits>.tar")
        if len(set(names)) != len(names):
            raise bad(f"a {name} shard is listed twice")
        if not all(type(v) is int and v >= 0 for v in counts + sizes):
            raise bad(f"a {name} shard's samples or bytes is not a count")
        if not shards or sum(counts) == 0:
            raise DataError(f"{path} lists no {name} samples; pack a tree with {name} images: python pack.py "
                            f"data=imagenet data.root=SRC out={root}")
        splits[name] = Split(classes, names, counts, sizes)
    train, val = splits["train"].classes, splits["val"].classes
    if train != val:
        only_train, only_val = set(train) - set(val), set(val) - set(train)
        parts = [f"only in train: {_listed(only_train)}" if only_train else "",
                 f"only in val: {_listed(only_val)}" if only_val else ""]
        differ = "; ".join(p for p in parts if p) or "the same names in another order"
        raise DataError(f"the train and val shards in {root} have different classes ({differ}), so a class index "
                        f"would mean one class in training and another in validation; pack both splits from one "
                        f"ImageFolder tree")
    for split in splits.values():
        for name, size in zip(split.shards, split.sizes):
            shard = root / name
            if not shard.is_file():
                raise DataError(f"shard {shard}, listed in {path}, is missing; copy it again or {REPACK}")
            actual = shard.stat().st_size
            if actual != size:
                raise DataError(f"shard {shard} is {actual} bytes but {path} says {size}: it is truncated or was "
                                f"replaced; copy it again or {REPACK}")
    return splits


# -- one epoch's plan --------------------------------------------------------------------------------------

Piece = tuple[int, int, int]  # (shard, first sample, end): samples [first, end) of one shard


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def pieces_between(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[Piece]:
    """The parts of shards covering positions [start, stop) of the stream of ``order``'s shards."""
    pieces, offset = [], 0
    for s in order:
        first, end = max(start, offset), min(stop, offset + counts[s])
        if first < end:
            pieces.append((s, first - offset, end - offset))
        offset += counts[s]
    return pieces


def buffered_order(n: int, size: int, rng: np.random.Generator) -> list[int]:
    """The order in which a shuffle buffer of ``size`` emits samples 0..n-1 that arrive in order:
    once full, each arriving sample takes the place of a random one, which is emitted; the rest
    come out in random order at the end. Sample ``order[t]`` has arrived by sample t + size, so
    at most ``size`` samples wait at any time."""
    if size <= 1 or n <= 1:
        return list(range(n))
    buffer = list(range(min(size, n)))
    out = []
    for i, j in zip(range(len(buffer), n), rng.integers(0, len(buffer), n - len(buffer)).tolist()):
        out.append(buffer[j])
        buffer[j] = i
    out.extend(buffer[i] for i in rng.permutation(len(buffer)).tolist())
    return out


def delivered(totals: Sequence[int], batch: int, n_batches: int) -> list[int]:
    """How many samples of each worker's stream are in the first ``n_batches`` batches the loader
    yields, when worker w sends ``totals[w] // batch`` whole batches then its remainder, the
    DataLoader takes the workers' batches in turn (skipping a worker that has finished), and
    :meth:`ShardLoader._merge` merges the remainders in arrival order."""
    sent = [[batch] * (t // batch) + ([-(t % batch)] if t % batch else []) for t in totals]
    taken, pending, out, pos = [0] * len(totals), deque(), 0, [0] * len(totals)
    while out < n_batches and any(p < len(s) for p, s in zip(pos, sent)):
        for w, items in enumerate(sent):
            if out >= n_batches or pos[w] >= len(items):
                continue
            size, pos[w] = items[pos[w]], pos[w] + 1
            if size > 0:
                taken[w] += size
                out += 1
                continue
            pending.append([w, -size])
            while out < n_batches and sum(n for _, n in pending) >= batch:
                need = batch
                while need:
                    part = pending[0]
                    use = min(need, part[1])
                    taken[part[0]] += use
                    part[1] -= use
                    need -= use
                    if not part[1]:
                        pending.popleft()
                out += 1
    return taken


# -- the datasets ------------------------------------------------------------------------------------------


class ShardSet(Dataset):
    """One split of a packed folder: its length, and sample i by index (for a few images, as
    visualize.py takes them; it reads shard i's headers up to that sample). Loaders stream it
    through :class:`ShardStream`."""

    def __init__(self, root: Path, split: Split, transform: TrainTransform | ValTransform, bad_images: str,
                 in_chans: int) -> None:
        self.root, self.split, self.transform, self.bad_images = root, split, transform, bad_images
        self.num_classes = len(split.classes)
        self.image_shape = (in_chans, transform.size, transform.size)

    def __len__(self) -> int:
        return self.split.total

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = 0
        while index >= self.split.counts[shard]:
            index -= self.split.counts[shard]
            shard += 1
        return next(self.load(self.samples([(shard, index, index + 1)])))

    def samples(self, pieces: Sequence[Piece], skip: set[int] = frozenset()) -> Iterator[tuple[int, Sample]]:
        """(position, sample) for the positions of ``pieces`` end to end, but those in ``skip``:
        a piece wholly in ``skip`` is not opened."""
        offset = 0
        for shard, first, end in pieces:
            positions = range(offset, offset + end - first)
            offset += end - first
            if all(p in skip for p in positions):
                continue
            path = self.root / self.split.shards[shard]

            def wanted(j: int, start: int = positions.start, first: int = first, end: int = end) -> bool:
                return first <= j < end and start + j - first not in skip

            j = -1
            for j, sample in enumerate(read_shard(path, self.num_classes, wanted)):
                if wanted(j):
                    yield positions.start + j - first, sample
                if j == end - 1:
                    break
            if j < end - 1:
                raise DataError(f"shard {path} ends after {j + 1} samples but the index says it holds "
                                f"{self.split.counts[shard]}: it is truncated or damaged; copy it again or {REPACK}")

    def load(self, samples: Iterator[tuple[int, Sample]]) -> Iterator[tuple[torch.Tensor, int] | None]:
        """Decoded and transformed samples; an unreadable image raises, or is None with data.bad_images=skip."""
        for _, sample in samples:
            try:
                yield self.transform(sample.image), sample.label
            except IMAGE_ERRORS as exc:
                if self.bad_images != "skip":
                    raise DataError(f"unreadable image {self.root / sample.where} ({type(exc).__name__}: "
                                    f"{one_line(exc)}); {REPACK} from readable images, or set "
                                    f"data.bad_images=skip") from exc
                warnings.warn(f"skipping unreadable image {self.root / sample.where} ({type(exc).__name__}: "
                              f"{one_line(exc)})", stacklevel=2)
                yield None


class ShardStream(IterableDataset):
    """What one rank's DataLoader iterates: each worker's batches of the epoch (see the module's
    docstring). ``state`` ([epoch, skip of worker 0, skip of worker 1, ...]) is in shared memory,
    so that persistent workers see the epoch the loader was set to."""

    def __init__(self, shards: ShardSet, batch: int, rank: int, world: int, seed: int, train: bool, workers: int,
                 buffer: int) -> None:
        self.shards, self.batch, self.rank, self.world, self.seed = shards, batch, rank, world, seed
        self.train, self.workers, self.buffer = train, workers, buffer
        self.state = torch.zeros(1 + workers, dtype=torch.int64).share_memory_()
        counts = shards.split.counts
        total = sum(counts)
        if train:
            self.batches = total // (world * batch)
            self.start, self.stop = rank * self.batches * batch, (rank + 1) * self.batches * batch
        else:
            self.start, self.stop = total * rank // world, total * (rank + 1) // world
            self.batches = math.ceil((self.stop - self.start) / batch)

    def pieces(self, epoch: int) -> list[list[Piece]]:
        """Each worker's pieces of this rank in ``epoch``."""
        counts = self.shards.split.counts
        order = shard_order(len(counts), self.seed, epoch, self.train)
        mine = pieces_between(counts, order, self.start, self.stop)
        return [mine[w::self.workers] for w in range(self.workers)]

    def worker_totals(self, epoch: int) -> list[int]:
        return [sum(end - first for _, first, end in pieces) for pieces in self.pieces(epoch)]

    def __iter__(self) -> Iterator[tuple]:
        # The state is read here, when the DataLoader (or its worker) starts iterating, not lazily.
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, skip = int(self.state[0]), int(self.state[1 + worker])
        return self._batches(worker, epoch, skip)

    def _batches(self, worker: int, epoch: int, skip: int) -> Iterator[tuple]:
        pieces = self.pieces(epoch)[worker]
        n = sum(end - first for _, first, end in pieces)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        order = buffered_order(n, self.buffer if self.train else 0, rng)
        done, rest = set(order[:skip]), order[skip:]
        stream = self.shards.samples(pieces, done)
        pending: dict[int, Sample] = {}

        def in_order() -> Iterator[tuple[int, Sample]]:
            for p in rest:
                while p not in pending:
                    q, sample = next(stream)
                    pending[q] = sample
                yield p, pending.pop(p)

        samples = self.shards.load(in_order())
        whole = len(rest) - len(rest) % self.batch
        for _ in range(whole // self.batch):
            kept = [s for s in (next(samples) for _ in range(self.batch)) if s is not None]
            yield ("whole", worker, *collate(kept, self.shards.image_shape))
        if whole < len(rest):
            yield ("part", worker, list(samples))


def collate(samples: list[tuple[torch.Tensor, int]], image_shape: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """A uint8 batch and its int64 labels; with every image of the batch unreadable
    (data.bad_images=skip), an empty batch of the right shape."""
    if samples:
        return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])
    return torch.empty(0, *image_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


class ShardLoader:
    """One rank's loader over a packed split: ``len()`` batches an epoch; ``set_epoch(epoch)`` before
    iterating; ``skip_next(n)`` after it, to resume an epoch after n of this rank's samples.

    ``loader.sampler`` is the loader itself, so the trainer's ``loader.sampler.set_epoch(epoch)``
    and ``loader.sampler.skip_next(n)`` work as with a map-style dataset's sampler."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool, persistent_workers: bool) -> None:
        self.stream, self.batch_size = stream, stream.batch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=self.pin_memory,
                                 persistent_workers=num_workers > 0 and persistent_workers)
        self.epoch = 0
        self._skips = [0] * stream.workers

    @property
    def sampler(self) -> ShardLoader:
        return self

    @property
    def dataset(self) -> ShardSet:
        return self.stream.shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, n: int) -> None:
        """The next iteration starts after the first ``n`` samples (whole batches) this rank's
        iteration of the current epoch yields."""
        if n % self.batch_size:
            raise ValueError(f"skip_next({n}) must skip whole batches of {self.batch_size}")
        self._skips = delivered(self.stream.worker_totals(self.epoch), self.batch_size, n // self.batch_size)

    def __len__(self) -> int:
        return self.stream.batches - sum(self._skips) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.state[0] = self.epoch
        self.stream.state[1:] = torch.tensor(self._skips)
        batches = iter(self.loader)  # now, not at the first batch: it draws its workers' seed from torch
        self._skips = [0] * self.stream.workers
        return self._merge(batches)

    def _merge(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        parts: list = []
        for kind, _worker, *data in batches:
            if kind == "whole":
                yield data[0], data[1]
                continue
            parts.extend(data[0])
            while len(parts) >= self.batch_size:
                yield self._collate(parts[:self.batch_size])
                del parts[:self.batch_size]
        if parts:  # validation's last batch; training's parts always add up to whole batches
            yield self._collate(parts)

    def _collate(self, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = collate([s for s in parts if s is not None], self.stream.shards.image_shape)
        return (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)


class ShardDataModule(DataModule):
    """data=shards: :class:`ShardLoader` for both splits."""

    def __init__(self, *, shuffle_buffer: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shuffle_buffer = shuffle_buffer

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> ShardLoader:
        """``len()`` batches of ``batch_size`` per epoch, the same on every rank (see the module's docstring)."""
        shards = self.train_set
        self.check_one_batch_per_rank(len(shards), batch_size, world_size)
        return self._loader(shards, batch_size, rank, world_size, seed, train=True)

    def val_loader(self, batch_size: int, rank: int = 0, world_size: int = 1) -> ShardLoader:
        """Every validation sample exactly once across ranks, in a fixed order, with no padding."""
        return self._loader(self.val_set, batch_size, rank, world_size, 0, train=False)

    def _loader(self, shards: ShardSet, batch: int, rank: int, world: int, seed: int, train: bool) -> ShardLoader:
        stream = ShardStream(shards, batch, rank, world, seed, train, max(1, self.num_workers), self.shuffle_buffer)
        return ShardLoader(stream, self.num_workers, self.pin_memory, self.persistent_workers)


@register_dataset("shards")
def build_shards(cfg: DictConfig) -> ShardDataModule:
    """A folder that pack.py wrote. The batches are uint8 images and int64 labels; ``data.mean``
    and ``data.std`` (ImageNet's in configs/data/shards.yaml) are for the device-side normalisation."""
    root = Path(str(cfg.root))
    splits = read_index(root)
    if cfg.in_chans not in MODES:
        raise DataError(f"data.in_chans={cfg.in_chans} is not supported for shards; set 3 (RGB) or 1 (grey)")
    if cfg.val_resize is not None and cfg.val_resize < cfg.image_size:
        raise DataError(f"data.val_resize={cfg.val_resize} is smaller than data.image_size={cfg.image_size}, so the "
                        f"validation crop would be padded; set data.val_resize >= data.image_size")
    if cfg.shuffle_buffer < 0:
        raise DataError(f"data.shuffle_buffer={cfg.shuffle_buffer} must not be negative (0: no shuffle buffer)")
    norm = normalization(cfg, cfg.in_chans, f"the shards in {root} (data.in_chans={cfg.in_chans})")
    mode, size = MODES[cfg.in_chans], cfg.image_size
    train_tf, val_tf = TrainTransform(size, mode), eval_transform(cfg)
    return ShardDataModule(
        name=cfg.name, class_names=splits["train"].classes, in_chans=cfg.in_chans, image_size=size, **norm,
        make_train_set=partial(ShardSet, root, splits["train"], train_tf, cfg.bad_images, cfg.in_chans),
        make_val_set=partial(ShardSet, root, splits["val"], val_tf, cfg.bad_images, cfg.in_chans),
        shuffle_buffer=cfg.shuffle_buffer, **loader_kwargs(cfg),
    )


# -- packing -----------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    """What :func:`pack` did."""

    out: Path
    samples: dict[str, int]  # packed images per split
    shards: dict[str, int]
    written: int  # shards written by this run
    kept: int  # shards found whole from an earlier, interrupted run
    skipped: int  # unreadable images left out (data.bad_images=skip)
    skipped_paths: list[str] = field(default_factory=list)  # those found by this run

    def summary(self) -> str:
        skipped = (f"; left out {self.skipped} unreadable image(s): {_listed(self.skipped_paths)}"
                   if self.skipped else "")
        kept = f" ({self.kept} kept from an earlier run)" if self.kept else ""
        return (f"packed {self.samples['train']} train and {self.samples['val']} val images into "
                f"{self.shards['train']} + {self.shards['val']} shards in {self.out}{kept}{skipped}; train from them "
                f"with: {command_line('train.py', {'data': 'shards', 'data.root': str(self.out)})}")


class _Encode(Dataset):
    """Item i: (extension, bytes, None) of the i-th source image as it goes into a shard, or
    (None, None, reason) for an unreadable one. Run by DataLoader workers, in parallel."""

    def __init__(self, paths: list[str], mode: str, max_side: int | None, quality: int) -> None:
        self.paths, self.mode, self.max_side, self.quality = paths, mode, max_side, quality

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str | None, bytes | None, str | None]:
        path = self.paths[i]
        try:
            size = os.path.getsize(path)
            if size > MAX_MEMBER_BYTES:
                return None, None, f"{size} bytes, more than the {MAX_MEMBER_BYTES} a packed image may have"
            image = open_image(path, self.mode)  # decodes it all: a broken file fails here, not in training
            with open(path, "rb") as f:
                data = f.read()
        except IMAGE_ERRORS as exc:
            return None, None, f"{type(exc).__name__}: {one_line(exc)}"
        ext = os.path.splitext(path)[1][1:].lower()
        if self.max_side is None or max(image.size) <= self.max_side:
            return ext, data, None
        scale = self.max_side / max(image.size)
        size = tuple(self.max_side if side == max(image.size) else max(1, round(side * scale)) for side in image.size)
        small = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=self.quality)
        return "jpg", buffer.getvalue(), None


def _as_is(item: Any) -> Any:
    return item


def shard_bounds(n: int, per_shard: int) -> list[tuple[int, int]]:
    """[first, end) of each of the ceil(n / per_shard) shards of n samples; their sizes differ by at most one."""
    shards = math.ceil(n / per_shard)
    return [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]


def pack(data_cfg: DictConfig, out: str | os.PathLike, max_side: int | None = None, quality: int = 90,
         shard_samples: int = 1000, num_workers: int | None = None) -> PackResult:
    """Packs the ImageFolder tree of ``data_cfg`` (data=imagenet) into shards in ``out``; see the
    module's docstring. ``num_workers`` processes decode and re-encode (default: ``data.num_workers``)."""
    try:
        from webdataset import TarWriter  # the [shards] extra: only packing needs it
    except ImportError:
        raise ConfigError("pack.py needs WebDataset, which is not installed: pip install -e \".[shards]\"") from None
    if data_cfg.name != "imagenet":
        raise ConfigError(f"pack.py packs an ImageFolder tree (data=imagenet data.root=SRC); data={data_cfg.name} "
                          f"is not one")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"max_side={max_side} must be positive, or null to keep the images as they are")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality} must be a JPEG quality from 1 to 100, e.g. 90")
    if shard_samples < 1:
        raise ConfigError(f"shard_samples={shard_samples} must be positive, e.g. 1000")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; name a folder for the shards")
    data = build_imagefolder(data_cfg)
    root = Path(str(data_cfg.root))
    mode = MODES[data_cfg.in_chans]
    listing = {"train": data.train_set.samples, "val": data.val_set.samples}
    # The training images go into the shards in a fixed random order: a shard then holds a mix of
    # classes, and shuffling shards and a buffer makes mixed batches.
    permutation = np.random.default_rng(PACK_ORDER_SEED).permutation(len(listing["train"])).tolist()
    listing["train"] = [listing["train"][i] for i in permutation]
    plan = {split: shard_bounds(len(items), shard_samples) for split, items in listing.items()}
    settings = {"format": FORMAT, "version": VERSION, "mode": mode, "max_side": max_side, "quality": quality,
                "shard_samples": shard_samples}
    digest = hashlib.sha256(json.dumps(
        [settings, data.class_names,
         {s: [[os.path.relpath(p, root), t] for p, t in items] for s, items in listing.items()}]).encode())
    _claim(out, {**settings, "source": str(root.resolve()), "fingerprint": digest.hexdigest()})

    names = {split: [shard_name(split, i) for i in range(len(bounds))] for split, bounds in plan.items()}
    todo = [(split, i) for split in SPLITS for i in range(len(plan[split])) if not (out / names[split][i]).is_file()]
    counts = {split: [0] * len(plan[split]) for split in SPLITS}
    skipped = 0
    for split in SPLITS:  # the shards of an earlier run: count what they hold (and check them)
        for i, name in enumerate(names[split]):
            if (out / name).is_file():
                counts[split][i] = sum(1 for _ in read_shard(out / name, len(data.class_names), lambda j: False))
                skipped += plan[split][i][1] - plan[split][i][0] - counts[split][i]
    sources = [(split, position) for split, i in todo for position in range(*plan[split][i])]
    encode = _Encode([listing[split][p][0] for split, p in sources], mode, max_side, quality)
    workers = default_num_workers() if num_workers is None else num_workers
    results = iter(DataLoader(encode, batch_size=None, num_workers=workers, collate_fn=_as_is))
    total = sum(len(items) for items in listing.values())
    skipped_paths = []
    with tqdm(total=total, initial=total - len(sources), unit="img", desc=f"packing into {out}",
              dynamic_ncols=True) as bar:
        for split, i in todo:
            first, end = plan[split][i]
            with atomic_open(out / names[split][i], "shard") as f, TarWriter(f, encoder=False, mtime=0) as writer:
                for position in range(first, end):
                    ext, data_bytes, error = next(results)
                    path, label = listing[split][position]
                    bar.update()
                    if error is not None:
                        if data_cfg.bad_images != "skip":
                            raise DataError(f"unreadable image {path} ({error}); delete or replace it, or set "
                                            f"data.bad_images=skip")
                        bar.write(f"skipping unreadable image {path} ({error})")
                        skipped_paths.append(path)
                        continue
                    writer.write({"__key__": f"{position:09d}", "cls": str(label).encode(), ext: data_bytes})
                    counts[split][i] += 1
    index = {"format": FORMAT, "version": VERSION, "max_side": max_side, "quality": quality,
             "splits": {split: {"classes": list(data.class_names),
                                "shards": [{"name": name, "samples": n, "bytes": (out / name).stat().st_size}
                                           for name, n in zip(names[split], counts[split])]}
                        for split in SPLITS}}
    write_json(out / INDEX, index, "shard index")
    return PackResult(out, {s: sum(counts[s]) for s in SPLITS}, {s: len(names[s]) for s in SPLITS},
                      written=len(todo), kept=sum(len(n) for n in names.values()) - len(todo),
                      skipped=skipped + len(skipped_paths), skipped_paths=skipped_paths)


def _claim(out: Path, plan: dict) -> None:
    """Writes ``out/pack.json`` for this packing, or checks that the one there is the same packing
    (then the shards already there are kept). A folder with other contents is refused."""
    marker = out / PLAN
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
        except (ValueError, UnicodeDecodeError):
            before = {}
        differ = [k for k in plan if k != "source" and before.get(k) != plan[k]]  # the tree may have moved
        if not differ:
            return
        what = ("other images" if differ == ["fingerprint"] else
                ", ".join(f"{k}={before.get(k)}" for k in differ if k != "fingerprint"))
        raise DataError(f"out={out} holds a packing of {what}, not of this command's (its {PLAN}); choose another "
                        f"out= folder, or delete {out} to re-pack")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"out={out} is not empty and holds no packing ({PLAN}); choose an empty or new folder")
    write_json(marker, plan, "packing plan")
