"""The distillation loop's plumbing: processes (torchrun/DDP) and the teacher cache. (The resumable training
state is edgekd.record's, shared with teacher fine-tuning.)"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


TEACHER_CACHE_ENV = "EDGEKD_TEACHER_CACHE_DIR"


def teacher_cache_root() -> Path:
    return Path(os.environ.get(TEACHER_CACHE_ENV) or Path.home() / ".cache" / "edgekd" / "teacher-outputs")


class TeacherCache:
    """Teacher logits and embeddings per training view (an image; with --flip, an image or its mirror image), on disk
    as memory-mapped .npy files in a folder named by their content key (the teachers' weights, each one's
    preprocessing and forward precision, the training images):
    filled on first sight, reused in later epochs and by later runs with the same teachers and images (another
    student, seed or loss, a resumed run). Rows are written before their `filled` flag, so a killed run leaves at
    most rows that are computed again.

    Valid only when an image's teacher input is the same every epoch (no augmentation; with --flip, one of two views,
    each with its own row: views.view_rows) and no feature maps are needed (they would not fit on disk for real data
    sets).
    """

    def __init__(self, folder: Path, size: int, teachers: int):
        from numpy.lib.format import open_memmap

        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.size, self.teachers = folder, size, teachers
        flags = folder / "filled.npy"
        if not flags.exists():  # made by the main process only (the others open it after a barrier)
            try:
                open_memmap(flags, mode="w+", dtype=np.bool_, shape=(size,)).flush()
            except OSError as error:
                flags.unlink(missing_ok=True)
                raise _named(error, flags) from None
        _reserve_disk(flags)
        self.filled = open_memmap(flags, mode="r+")
        self.slots: list[tuple[np.ndarray, np.ndarray] | None] = [self._open(k) for k in range(teachers)]
        if any(slot is None for slot in self.slots) and bool(self.filled.any()):
            # rows marked filled whose file is gone (removed by hand, or never made whole): none can be trusted
            log.warning("teacher cache %s: outputs missing for rows marked filled; they are computed again", folder)
            self.filled[:] = False
        self.hits = self.misses = 0

    @property
    def cached(self) -> int:
        return int(self.filled.sum())

    def _paths(self, k: int) -> tuple[Path, Path]:
        """Teacher k's logits and embedding files."""
        return self.folder / f"logits_{k}.npy", self.folder / f"embedding_{k}.npy"

    def _open(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        from numpy.lib.format import open_memmap

        paths = self._paths(k)
        if not all(path.exists() for path in paths):
            return None
        for path in paths:
            _reserve_disk(path)
        return open_memmap(paths[0], mode="r+"), open_memmap(paths[1], mode="r+")

    def missing(self, indices: torch.Tensor) -> torch.Tensor:
        """Which rows are not filled yet (the teacher must answer them); counted as misses, the rest as hits."""
        missing = torch.from_numpy(~np.asarray(self.filled[indices.cpu().numpy()]))
        self.misses += int(missing.sum())
        self.hits += len(missing) - int(missing.sum())
        return missing

    def read(self, indices: torch.Tensor, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each teacher's (logits, embedding) rows, all filled."""
        rows = indices.cpu().numpy()
        return [(torch.from_numpy(np.asarray(logits[rows])).to(device),  # type: ignore[index]
                 torch.from_numpy(np.asarray(embedding[rows])).to(device)) for logits, embedding in self.slots]

    def store(self, indices: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        rows = indices.cpu().numpy()
        for k, (logits, embedding) in enumerate(outputs):
            if self.slots[k] is None:
                self.slots[k] = tuple(  # type: ignore[assignment]
                    _create_once(path, (self.size, *tensor.shape[1:]))
                    for path, tensor in zip(self._paths(k), (logits, embedding)))
            self.slots[k][0][rows] = logits.detach().float().cpu().numpy()  # type: ignore[index]
            self.slots[k][1][rows] = embedding.detach().float().cpu().numpy()  # type: ignore[index]
        self.filled[rows] = True

    def flush(self) -> None:
        for slot in self.slots:
            if slot is not None:
                slot[0].flush()
                slot[1].flush()
        self.filled.flush()


def _create_once(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An fp32 .npy memmap at `path`, created whole by whichever process gets there first and opened by the others.

    Under torchrun every process stores its own rows and may find the file missing at the same moment; had each
    created it (mode w+ truncates), a process would lose the rows written so far or die of SIGBUS on the file it had
    mapped. So the file is made under a private name and hard-linked into place: the link is atomic and fails if
    another process linked first, and every process then maps the one file that won."""
    from numpy.lib.format import open_memmap

    if not path.exists():
        private = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            open_memmap(private, mode="w+", dtype=np.float32, shape=shape).flush()
            os.link(private, path)
        except FileExistsError:
            pass
        except OSError as error:  # a full disk fails numpy's header write already: name the file, not the temporary
            raise _named(error, path) from None
        finally:
            private.unlink(missing_ok=True)
    _reserve_disk(path)  # every process, on the one shared file: the same blocks, reserved before any row is written
    return open_memmap(path, mode="r+")


def _reserve_disk(path: Path) -> None:
    """Allocate the file's blocks before it is mapped (numpy makes it sparse): a memory map written where the disk
    has no room left dies of SIGBUS, where this raises ENOSPC naming the file, which the CLI answers with the setting
    that moves the cache (EDGEKD_TEACHER_CACHE_DIR). Done on every opening, by every process: blocks already there
    cost nothing, so one file is never reserved twice, and a file a killed run left sparse is reserved by the next.
    Where the system has no posix_fallocate (macOS, Windows) or the file system refuses it, the map's writes are all
    there is."""
    if not hasattr(os, "posix_fallocate"):
        return
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise _named(error, path) from None
    finally:
        os.close(descriptor)


def _named(error: OSError, path: Path) -> OSError:
    """The same error naming `path` (what the user would look for), not a temporary or no file at all."""
    return OSError(error.errno, os.strerror(error.errno) if error.errno else str(error), str(path))
