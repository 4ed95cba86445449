"""Samplers that split a dataset across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


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
