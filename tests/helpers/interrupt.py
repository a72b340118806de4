"""A Ctrl-C at a chosen point of training: real records that raise KeyboardInterrupt after `count` reads."""

from __future__ import annotations

import torch


class InterruptAfter(torch.utils.data.Dataset):
    """The real training records, with a Ctrl-C arriving after `count` images have been read."""

    def __init__(self, records, count: int):
        self.records, self.count, self.reads = records, count, 0
        self.labels = records.labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads > self.count:
            raise KeyboardInterrupt
        return self.records[index]
