"""The distillation loop's plumbing: processes (torchrun/DDP), the resumable training state, the teacher cache."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from edgekd.artifacts import atomic_path
from edgekd.train_utils import pick_device

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


@dataclass
class TrainState:
    """What a resumed run needs to continue exactly: progress, metrics so far, and every stateful object."""

    step: int = 0
    history: list[dict[str, Any]] | None = None
    partial: dict[str, float] | None = None  # the interrupted epoch's running sums


def save_state(out_dir: Path, key: str, state: TrainState, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Written whole (atomically) by rank 0: at every epoch end and when interrupted."""
    partial = {k: float(v) for k, v in (state.partial or {}).items()}
    payload = {"key": key, "step": state.step, "history": json.dumps(state.history or []),
               "partial": json.dumps(partial), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(Path(out_dir) / STATE_NAME) as tmp:
        torch.save(payload, tmp)


def load_state(out_dir: Path, key: str, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    """Restore a previous run of the same configuration; one of another configuration is ignored, loudly."""
    path = Path(out_dir) / STATE_NAME
    if not path.exists():
        log.info("--resume: no checkpoint in %s yet, starting from the beginning", out_dir)
        return TrainState(history=[])
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != key:
        log.warning("not resuming from %s: it was written by a run with another configuration (teachers, student, "
                    "data, losses or hyper-parameters); starting over", path)
        return TrainState(history=[])
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    log.info("resuming from %s at step %d", path, saved["step"])
    history, partial = json.loads(saved["history"]), json.loads(saved["partial"])
    return TrainState(step=int(saved["step"]), history=history, partial=partial or None)


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
