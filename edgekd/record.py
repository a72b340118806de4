"""The run record: what every stage's result was made from, by content, and the resumable training state.

A stage's key is a hash of its inputs' contents (sha256 of weights and checkpoints, the data's fingerprint, the
options that change the outcome) and of the library versions that change it. A stage whose key and outputs are
unchanged is reused; any changed input redoes it, and, because each later stage keys on the content of what the
one before produced, everything after it. Every resume point (teacher fine-tuning, selection, distillation,
export, reference models, bench) goes through this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from edgekd import __version__
from edgekd.artifacts import atomic_path, canonical_json, config_hash, sha256_file, write_json_atomic
from edgekd.errors import EdgekdError, first_line

if TYPE_CHECKING:
    from edgekd.data import LoadedData

log = logging.getLogger(__name__)

STAGES_NAME = "stages.json"


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The libraries whose version can change a stage's result (exported graphs, quantization, kernels, weights)."""
    import onnx
    import onnxruntime
    import timm

    return {"edgekd": __version__, "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's processor (latencies measured here are valid only here): /proc/cpuinfo's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def int8_instructions() -> list[str]:
    """The CPU's int8 dot-product instructions (/proc/cpuinfo flags): hosts with and without them run the same int8
    files at different speeds and roundings, so a benchmark row names them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]


@lru_cache(maxsize=None)
def code_digest(package: str) -> str:
    """The source of one edgekd subpackage by content (e.g. "deploy": export, quantization, bias correction, learned
    rounding). The package version does not change when that code does, and a stage made by other code (a bundle
    quantized before learned rounding existed, say) must not be answered from a run folder made before it."""
    root = Path(__file__).parent / package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """The content key of one stage: its name, its inputs (already by content) and the versions."""
    return config_hash(key_inputs(stage, inputs))


def key_inputs(stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What stage_key hashes; kept beside a training state, so a refused resume can say what changed."""
    return {"stage": stage, "inputs": inputs, "versions": versions()}


# How the inputs of a training key read in a message (the others by their own name).
_INPUT_NAMES = {"data": "the images or labels", "teachers": "the teacher's weights",
                "start": "the student's starting weights", "specs": "the loss terms",
                "world": "the number of processes", "student": "the student model", "identity": "the model",
                "preprocess": "the preprocessing"}


def changed_inputs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The inputs that differ between two key_inputs, for people: options as `name old -> new`."""
    changes, current = [], json.loads(canonical_json(current))  # as saved: tuples as lists
    for group in ("inputs", "versions"):
        old, new = saved.get(group, {}), current.get(group, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) == new.get(name):
                continue
            if name == "config" and isinstance(old.get(name), dict) and isinstance(new.get(name), dict):
                changes += [f"{option} {old[name].get(option)} -> {new[name].get(option)}"
                            for option in sorted(set(old[name]) | set(new[name]))
                            if old[name].get(option) != new[name].get(option)]
            elif group == "versions":
                changes.append(f"{name} {old.get(name)} -> {new.get(name)}")
            else:
                changes.append(_INPUT_NAMES.get(name, name))
    return changes


def data_fingerprint(data: LoadedData, *, unlabeled: bool = True) -> str:
    """The data by content identity, each split's records saying what identifies them (fingerprint_into): for files,
    every path with its size and modification time (an added, removed, replaced or edited image changes it); for a
    tar, the archive and its members; for in-memory sets (Fashion-MNIST), the pixels. With the labels, so a
    relabelled image changes it too. `unlabeled`: with the --unlabeled-data images (distillation sees them; the
    teacher's fine-tuning does not, so its key leaves them out). Computed once per loaded data set."""
    attribute = f"_fingerprint_{unlabeled}"
    cached = getattr(data, attribute, None)
    if cached is not None:
        return cached
    splits = (data.train, data.val, data.unlabeled if unlabeled else None)
    fingerprint = config_hash([records_fingerprint(split) if split is not None else None for split in splits])
    object.__setattr__(data, attribute, fingerprint)  # LoadedData is frozen; the fingerprint never changes
    return fingerprint


def records_fingerprint(records: Any) -> str:
    """One set of records by content, as the records say (their fingerprint_into); a wrapping dataset (one that
    re-orders or watches reads) by its source's."""
    while not hasattr(records, "fingerprint_into") and hasattr(records, "records"):
        records = records.records
    if not hasattr(records, "fingerprint_into"):
        raise TypeError(f"cannot fingerprint {type(records).__name__}: it has no fingerprint_into")
    digest = hashlib.sha256()
    records.fingerprint_into(digest)
    return digest.hexdigest()


@dataclass
class StageRecord:
    """stages.json: for each stage, the key it last finished with and when. A stage runs again only when its key
    changed or an output is missing; a stage that did not run leaves its entry, and the file, untouched."""

    run_dir: Path
    entries: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path) -> StageRecord:
        path = Path(run_dir) / STAGES_NAME
        raw = json.loads(path.read_text()) if path.exists() else {}
        # runs written before the record kept times held plain keys
        entries = {stage: value if isinstance(value, dict) else {"key": value} for stage, value in raw.items()}
        return cls(Path(run_dir), entries)

    def fresh(self, stage: str, key: str, *outputs: Path) -> bool:
        """Whether `stage` finished with `key` and its outputs (files or folders) are as it wrote them: present, and
        with the sha256 recorded then, so a file cut short by a crash or edited by hand is made again, not reused."""
        entry = self.entries.get(stage, {})
        if entry.get("key") != key or not all(Path(p).exists() for p in outputs):
            return False
        recorded = entry.get("outputs") or {}  # none: a run recorded before the record kept digests
        # the files it wrote, only (an app's node_modules installed into export/ afterwards is not the stage's)
        changed = sorted(name for name, digest in recorded.items()
                         if not (self.run_dir / name).is_file() or sha256_file(self.run_dir / name) != digest)
        if changed:
            log.warning("%s: %s changed since this run wrote it (damaged or edited); making it again", stage,
                        ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
            return False
        return True

    def done(self, stage: str, key: str, *outputs: Path) -> None:
        self.entries[stage] = {"key": key, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "outputs": output_digests(self.run_dir, outputs)}
        write_json_atomic(self.run_dir / STAGES_NAME, self.entries)

    def rewrote(self, stage: str, *outputs: Path) -> None:
        """`stage`'s outputs were rewritten on purpose later in the run (the selection, when its choice gave way to
        the next candidate): its key stands, the digests follow the files."""
        entry = self.entries.setdefault(stage, {})
        entry["outputs"] = {**entry.get("outputs", {}), **output_digests(self.run_dir, outputs)}
        write_json_atomic(self.run_dir / STAGES_NAME, self.entries)


def output_digests(run_dir: Path, outputs: tuple[Path, ...]) -> dict[str, str]:
    """sha256 of each output file, and of each file under an output folder (hidden staging files aside), by its path
    relative to the run folder."""
    files = []
    for output in map(Path, outputs):
        if output.is_dir():
            files += sorted(f for f in output.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif output.exists():
            files.append(output)
    return {str(f.relative_to(run_dir)) if f.is_relative_to(run_dir) else str(f): sha256_file(f) for f in files}


# ------------------------------------------------------------------------------------------------ training state

@dataclass
class TrainState:
    """What a resumed training run needs to continue exactly: progress, metrics so far, the interrupted epoch."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] | None = None  # the interrupted epoch's running sums


def save_training_state(path: Path, key: str, state: TrainState, model: torch.nn.Module, optimizer,
                        scheduler, inputs: dict[str, Any] | None = None) -> None:
    """Written whole (atomically): at every epoch end and when interrupted. With the random generators' states, so
    the resumed run draws the same batches and augmentations as an uninterrupted one; with the key's `inputs`
    (key_inputs), so a resume refused for changed inputs can name them."""
    partial = {k: float(v) for k, v in (state.partial or {}).items()}
    payload = {"key": key, "inputs": canonical_json(inputs or {}), "step": state.step,
               "history": json.dumps(state.history), "partial": json.dumps(partial),
               "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)  # through a Python file: a full disk is an OSError, not torch's "unexpected pos"


@contextlib.contextmanager
def state_kept_on_interrupt(save: Callable[[], int | None], path: Path) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, raised as KeyboardInterrupt) inside, whether in a batch or in the epoch's validation:
    `save` writes the training state and returns its step (None where this process does not save: torchrun's other
    ranks) before the interrupt goes on, so a re-run continues from there instead of from the last finished epoch."""
    try:
        yield
    except KeyboardInterrupt:
        step = save()
        if step is not None:
            log.info("interrupted at step %d; checkpoint saved in %s", step, path)
        raise


def resume_training_state(path: Path, key: str, model: torch.nn.Module, optimizer, scheduler,
                          inputs: dict[str, Any] | None = None, must_match: bool = False) -> TrainState:
    """Restore a previous run with the same key; a state written for other inputs is ignored, loudly, or, where the
    user asked to resume that run (`must_match`), refused: starting over would replace what they asked to keep."""
    path = Path(path)
    if not path.exists():
        return TrainState()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a file cut short fails in torch's zip reader, pickle or elsewhere
        log.warning("not resuming from %s: it cannot be read (%s); starting over", path, first_line(error))
        return TrainState()
    if saved.get("key") != key and must_match:
        recorded = json.loads(saved.get("inputs") or "{}")
        changes = "; ".join(changed_inputs(recorded, inputs or {})) if recorded else \
            "an earlier edgekd saved it without recording them, so they cannot be compared"
        raise EdgekdError(f"cannot resume from {path}: it was saved at step {saved.get('step')} for other inputs ("
                          f"{changes or 'weights, data, options or versions'}); run with the settings it was made "
                          "with, or start over with --overwrite (its state is replaced)")
    if saved.get("key") != key:
        log.warning("not resuming from %s: it was written for other inputs (weights, data, options or versions); "
                    "starting over", path)
        return TrainState()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if "rng" in saved:
        torch.set_rng_state(saved["rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    log.info("resuming from %s at step %d", path, saved["step"])
    partial = json.loads(saved.get("partial", "{}"))
    return TrainState(step=int(saved["step"]), history=json.loads(saved["history"]), partial=partial or None)
