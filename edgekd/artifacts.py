"""Writing run artifacts safely: whole or not at all, hashed, recorded in the run's manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from edgekd.errors import EdgekdError
from edgekd.types import Artifact

MANIFEST_NAME = "manifest.json"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block finishes.

    A killed process leaves at most a stray temporary file, never a half-written artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:  # a read-only or full disk: said of the artifact, not of a hidden temporary name
        raise OSError(error.errno, error.strerror, str(target)) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; artifacts are meant to be shared
            if tmp.is_file():
                with open(tmp, "rb") as written:  # on disk before it takes the name: a power cut leaves old or new
                    os.fsync(written.fileno())  # (a full disk or quota may only tell here: delayed allocation)
            os.replace(tmp, target)
        except Exception as error:  # noqa: BLE001 - re-raised, as the OS error it was where that can be told
            told = _as_os_error(error, target, tmp)
            if told is error:
                raise
            raise told from error
    finally:
        if tmp.exists():
            tmp.unlink()


# Writers in C++ and Rust (torch's zip writer, safetensors, ONNX Runtime) report a full disk in their own words:
# "unexpected pos 2977664 vs 2977560", "I/O error: No space left on device (os error 28)".
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")
_NEARLY_FULL_BYTES = 1 << 20


def _as_os_error(error: Exception, target: Path, tmp: Path) -> Exception:
    """A failed write as the OSError it was (errno and the artifact's path, so the CLI can say "the disk is full:
    free space or write elsewhere"), when the error says so or the disk holding `target` has no room left; any
    other error as it is."""
    if isinstance(error, EdgekdError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        named_for_us = error.filename in (None, str(tmp), tmp)  # the temporary file means nothing to the user
        return OSError(error.errno, error.strerror, str(target)) if named_for_us else error
    match = _OS_ERROR_IN_TEXT.search(str(error))
    if match:
        number = int(match[1])
        return OSError(number, os.strerror(number), str(target))
    if not isinstance(error, RuntimeError):  # torch's writer's kind; any other error is a bug to see whole
        return error
    try:
        full = shutil.disk_usage(target.parent).free < _NEARLY_FULL_BYTES  # measured with the partial file there
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) if full else error


def staging_prefix(target: Path) -> str:
    """The name a folder being written for `target` starts with, beside it: hidden, and with the writer's process id
    so that a later run can tell one a killed process left (remove_stale_staging) from one being written now."""
    return f".{Path(target).name}.{os.getpid()}."


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of `target` whose writer is no longer running (killed with SIGKILL, the machine
    went down): nothing else ever would."""
    for folder in Path(target).parent.glob(f".{Path(target).name}.*"):
        pid = folder.name[len(Path(target).name) + 2:].split(".", 1)[0]
        if not folder.is_dir() or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, payload: Any) -> None:
    write_text_atomic(target, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


_HASHED: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """The file's sha256. Stage keys ask for the same weights several times a run (a ViT-B teacher is 350 MB): a file
    whose inode, size and modification time are unchanged is not read again in this process."""
    stat = os.stat(path)
    identity = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _HASHED[identity] = digest.hexdigest()
    return _HASHED[identity]


def config_hash(config: Any) -> str:
    """A stable short hash of a JSON-able config: the cache key of a stage."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def canonical_json(config: Any) -> str:
    """The text config_hash hashes (sorted keys; tuples as lists, paths and dataclasses as _json_default writes)."""
    return json.dumps(config, sort_keys=True, default=_json_default)


def read_manifest(run_dir: Path) -> list[Artifact]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return []
    return [Artifact(**entry) for entry in json.loads(path.read_text())]


def record_artifact(run_dir: Path, artifact: Artifact) -> None:
    """Add or replace (by path) one manifest entry; the manifest itself is rewritten atomically."""
    entries = [a for a in read_manifest(run_dir) if a.path != artifact.path]
    entries.append(artifact)
    write_json_atomic(Path(run_dir) / MANIFEST_NAME, [asdict(a) for a in entries])


def make_artifact(run_dir: Path, stage: str, path: Path, *, parent: str | None = None,
                  config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> Artifact:
    """Hash a finished file and record it in the run's manifest."""
    run_dir = Path(run_dir)
    artifact = Artifact(stage=stage, path=str(Path(path).resolve().relative_to(run_dir.resolve())),
                        sha256=sha256_file(path), parent=parent, config=config or {}, metrics=metrics or {})
    record_artifact(run_dir, artifact)
    return artifact
