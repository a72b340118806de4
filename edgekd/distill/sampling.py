"""Data order and augmentation as pure functions of (seed, epoch, index), so a resumed run sees the same batches.

The sampler (a DistributedSampler, also with one process) yields (index, epoch) keys; the dataset seeds each
item's random crop/flip from its key. Worker count, DDP rank and interruptions then change nothing.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """This process's share of a seeded per-epoch shuffle, as (index, epoch) keys; can start mid-epoch."""

    def __init__(self, size: int, *, num_replicas: int, rank: int, seed: int, drop_last: bool):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch`, leaving out its first `skip` samples (already trained on before an interruption)."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class SeededItems(Dataset):
    """Wraps a dataset: item (index, epoch) is made under a seed derived from (seed, epoch, index), plus its index."""

    def __init__(self, inner: Dataset, seed: int):
        self.inner = inner
        self.seed = seed

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream (dropout, init) untouched
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return (*self.inner[index], index)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1)
