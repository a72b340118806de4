"""The distillation loop's plumbing: processes (torchrun/DDP) and the teacher cache. (The resumable training
state is edgekd.record's, shared with teacher fine-tuning.)"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from edgekd.distill.train_utils import pick_device

log = logging.getLogger(__name__)

STATE_NAME = "distill_state.pt"


@dataclass(frozen=True)
class Processes:
    """Where this process stands: one process, or one rank of a torchrun launch (RANK / WORLD_SIZE set)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(requested_device: str) -> Processes:
    """Join torchrun's process group when launched by it (NCCL on GPUs, gloo on CPUs); otherwise run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested_device)
    if world <= 1:
        return Processes(0, 1, device, owns_group=False)
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device, owns_group=owns)


def finish_processes(processes: Processes) -> None:
    if processes.world > 1:
        dist.barrier()
        if processes.owns_group:
            dist.destroy_process_group()


def sync_buffers(processes: Processes, model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere: DDP syncs them before each forward, so the last batch's differ."""
    if processes.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def agree_on_minimum(processes: Processes, value: int) -> int:
    """The smallest of every rank's `value` (e.g. the slice size each measured): ranks that slice a batch
    differently would make DDP wait forever for a gradient all-reduce."""
    if processes.world <= 1:
        return value
    tensor = torch.tensor([value], device=processes.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def share_from_main(processes: Processes, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the final metrics only rank 0 measured)."""
    if processes.world <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TeacherCache:
    """Teacher logits and embeddings per training image, filled on first sight and reused in later epochs.

    Valid only when an image's teacher input is the same every epoch (no augmentation) and no feature maps
    are needed (they would not fit in memory for real datasets).
    """

    def __init__(self, size: int, teachers: int):
        self.size = size
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * teachers
        self.filled = torch.zeros(size, dtype=torch.bool)

    def lookup(self, indices: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not bool(self.filled[indices].all()):
            return None
        return [(logits[indices], embedding[indices]) for logits, embedding in self.slots]  # type: ignore[misc]

    def store(self, indices: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for k, (logits, embedding) in enumerate(outputs):
            if self.slots[k] is None:
                self.slots[k] = (logits.new_zeros(self.size, *logits.shape[1:]),
                                 embedding.new_zeros(self.size, *embedding.shape[1:]))
            self.slots[k][0][indices] = logits  # type: ignore[index]
            self.slots[k][1][indices] = embedding  # type: ignore[index]
        self.filled[indices] = True
