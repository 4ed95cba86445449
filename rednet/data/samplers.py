"""Samplers that split a dataset across data-parallel ranks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``world_size`` gets indices r, r + world_size, r + 2 * world_size, ... in order.

    For evaluation: unlike ``DistributedSampler`` it never pads a short shard with repeated
    indices, so summing counts over ranks sees every sample exactly once. Shards may differ in
    length by one.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start its next pass part-way, for mid-epoch resume.

    ``skip_next(n)`` drops the first ``n`` indices of the next ``__iter__`` only, so a resumed run
    neither loads nor decodes the samples it already trained on.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        # DataLoader asks for the iterator lazily, at the first batch: consume the skip here.
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)

    def __len__(self) -> int:
        return self.num_samples - self._skip
