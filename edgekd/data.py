"""Datasets behind --data: an ImageFolder tree, a folder of unlabeled images, or the real Fashion-MNIST.

Every source yields (PIL image, label) records; label is -1 when there are none. ModelInputs turns a
record into one tensor per model, each with that model's own timm preprocessing, so a teacher and a
student with different sizes or mean/std each see their own input of the same augmented view.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import io
import logging
import os
import posixpath
import tarfile
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from edgekd.errors import EdgekdError, first_line
from edgekd.runtime import BundleError, as_model_pixels, read_image
from edgekd.types import DatasetInfo, DataSpec, Preprocess

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
UNLABELED = -1
# An evaluation row whose image could not be decoded: a placeholder every figure leaves out (evaluation never
# takes another image in its place, which would count that one twice).
UNREADABLE = -2


class ArrayRecords(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])

    decoded_or_none = __getitem__  # pixels in memory always decode

    def subset(self, indices: list[int]) -> ArrayRecords:
        return ArrayRecords(self.images[indices], self.labels[indices])

    def fingerprint_into(self, digest) -> None:
        """The run record's identity of these images (edgekd.record.data_fingerprint): the pixels and labels."""
        digest.update(self.images.tobytes())
        digest.update(self.labels.tobytes())


def file_identity(stat: os.stat_result) -> str:
    """A file's content identity without reading it: its size and modification time (FileRecords)."""
    return f"{stat.st_size}\0{stat.st_mtime_ns}"


class DecodedRecords(Dataset):
    """Images decoded lazily, upright and 8-bit as a viewer shows them (edgekd.runtime.as_model_pixels).

    An image that cannot be decoded when it is read (truncated, damaged) is skipped: the next readable one takes its
    place in that batch, it is marked in a table shared with the loader's worker processes, and `unreadable` counts
    the marks, so one bad file in a million never stops an epoch. Subclasses say where the bytes come from.
    """

    def __init__(self, labels: Sequence[int]):
        self.labels = np.asarray(labels, dtype=np.int64)
        # One flag per image in shared memory: DataLoader workers (torch.multiprocessing) mark what they skip.
        self.bad = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def unreadable(self) -> int:
        return int(self.bad.sum())

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for offset in range(len(self)):
            read = self.decoded_or_none((index + offset) % len(self))
            if read is not None:
                return read
        raise EdgekdError(f"none of the {len(self)} images can be decoded (e.g. {self.name(index)}); check the files")

    def decoded_or_none(self, index: int) -> tuple[Image.Image, int] | None:
        """This image and its label, or None when it cannot be decoded (marked and logged the first time)."""
        if bool(self.bad[index]):
            return None
        try:
            return _upright(self.decode(index)), int(self.labels[index])
        except BundleError as error:
            self.bad[index] = True
            log.warning("skipping %s", first_line(error, 300))
            return None

    def decode(self, index: int) -> Image.Image:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError


class FileRecords(DecodedRecords):
    """Image files on disk."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]):
        super().__init__(labels)
        self.paths = list(paths)

    def decode(self, index: int) -> Image.Image:
        return read_image(self.paths[index])

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def subset(self, indices: list[int]) -> FileRecords:
        return FileRecords([self.paths[i] for i in indices], self.labels[indices])

    def fingerprint_into(self, digest) -> None:
        """Every file's path, size and modification time, with its label: an added, removed, replaced or edited
        image changes it, without reading any pixels. (Not the change time, st_ctime: chmod, chown, a scheduler
        re-owning a volume or a viewer's extended attributes move it, and a killed run could then never resume; a
        picture swapped for another of the same size with its old modification time put back goes unnoticed, as
        it does by rsync's and make's checks.)"""
        for path, label in zip(self.paths, self.labels.tolist()):
            stat = os.stat(path)
            digest.update(f"{path}\0{file_identity(stat)}\0{label}\n".encode())


class TarRecords(DecodedRecords):
    """Images inside a .tar archive, read in place with timm's tar reader (timm.data.readers.ReaderImageInTar);
    `members` index its samples."""

    def __init__(self, reader, members: Sequence[int], labels: Sequence[int]):
        super().__init__(labels)
        self.reader, self.members = reader, list(members)

    def decode(self, index: int) -> Image.Image:
        try:
            handle, _ = self.reader[self.members[index]]
        except (OSError, tarfile.TarError) as error:
            raise BundleError(f"cannot read image {self.name(index)}: {error}") from error
        return read_image(handle, self.name(index))

    def name(self, index: int) -> str:
        return f"{self.reader.root}:{self.reader._filename(self.members[index])}"

    def subset(self, indices: list[int]) -> TarRecords:
        return TarRecords(self.reader, [self.members[i] for i in indices], self.labels[indices])

    def fingerprint_into(self, digest) -> None:
        """Each archive's size and modification time, then each member's name and size with its label."""
        root = Path(self.reader.root)
        for archive in tar_archives_in(root) if root.is_dir() else [root]:
            digest.update(f"{archive}\0{file_identity(os.stat(archive))}\n".encode())
        for member, label in zip(self.members, self.labels.tolist()):
            info = self.reader.samples[member][0]
            digest.update(f"{info.name}\0{info.size}\0{label}\n".encode())


class ShardRecords(DecodedRecords):
    """WebDataset shards: .tar files whose members are KEY.EXT, an image per key and KEY.cls with its class index.
    Indexed once (every member's header, and the small .cls files), then read in place: each image is a seek and a
    read into its shard, so any record can be had in any order (stratified splits, calibration subsets, torchrun's
    per-rank shares)."""

    def __init__(self, shards: Sequence[Path], entries: np.ndarray, names: Sequence[str], labels: Sequence[int]):
        super().__init__(labels)
        self.shards, self.entries, self.names = list(shards), entries, list(names)  # entries: shard, offset, size

    def decode(self, index: int) -> Image.Image:
        shard, offset, size = (int(v) for v in self.entries[index])
        try:
            with open(self.shards[shard], "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as error:
            raise BundleError(f"cannot read image {self.name(index)}: {error}") from error
        return read_image(io.BytesIO(data), self.name(index))

    def name(self, index: int) -> str:
        return f"{self.shards[int(self.entries[index][0])]}:{self.names[index]}"

    def subset(self, indices: list[int]) -> ShardRecords:
        return ShardRecords(self.shards, self.entries[indices], [self.names[i] for i in indices],
                            self.labels[indices])

    def fingerprint_into(self, digest) -> None:
        """Each shard's size and modification time, then each image's place and label."""
        for shard in self.shards:
            digest.update(f"{shard}\0{file_identity(os.stat(shard))}\n".encode())
        digest.update(self.entries.tobytes())
        digest.update(self.labels.tobytes())


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _upright(image: Image.Image) -> Image.Image:
    """8-bit grey or RGB as on screen; a grey file stays grey, so each model's own channel conversion (ToMode) does
    to it exactly what edgekd.runtime does to the same file."""
    return as_model_pixels(image, "L" if image.mode in GREY_MODES else "RGB")


Records = Union[ArrayRecords, FileRecords, TarRecords, ShardRecords]


@dataclass(frozen=True)
class LoadedData:
    info: DatasetInfo
    train: Records
    val: Records
    unlabeled: FileRecords | None = None  # --unlabeled-data: for distillation only


class TrainingRecords(Dataset):
    """What distillation trains on: the labeled training images, repeated `labeled_repeat` times per epoch, then the
    --unlabeled-data images (label -1: the student learns them from the teacher alone). Shuffled together by the
    sampler, each batch holds both in the proportion of their counts here."""

    def __init__(self, labeled: Records, unlabeled: FileRecords | None, labeled_repeat: int = 1):
        if labeled_repeat < 1:
            raise EdgekdError(f"--labeled-repeat {labeled_repeat} must be at least 1")
        self.parts = [labeled] * labeled_repeat + ([unlabeled] if unlabeled is not None else [])
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
        self.labels = np.concatenate([part.labels for part in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]

    def fingerprint_into(self, digest) -> None:
        for part in self.parts:
            part.fingerprint_into(digest)


def training_records(data: LoadedData, labeled_repeat: int = 1) -> Records | TrainingRecords:
    """The distillation training set: the labeled split alone, or with the --unlabeled-data images."""
    if data.unlabeled is None and labeled_repeat == 1:
        return data.train
    return TrainingRecords(data.train, data.unlabeled, labeled_repeat)


def skipped_images(data: LoadedData) -> int:
    """Files left out: unidentifiable when the folder was read, plus those found undecodable by this process's reads
    (or recalled from an earlier one's: recall_unreadable)."""
    return data.info.skipped_corrupt + sum(records.unreadable for _, records in _decoded_splits(data))


def unreadable_marks(data: LoadedData) -> dict[str, list[int]]:
    """The images of each split found undecodable so far (their indices), for a later process to recall."""
    return {split: torch.nonzero(records.bad).flatten().tolist() for split, records in _decoded_splits(data)}


def recall_unreadable(data: LoadedData, marks: dict[str, list[int]]) -> None:
    """Mark as undecodable the images an earlier process found so (unreadable_marks, on the same data): a stage it
    ran and this one reuses does not read them again, yet they are skipped and counted the same."""
    named = []
    for split, records in _decoded_splits(data):
        indices = [index for index in marks.get(split, []) if 0 <= index < len(records) and not records.bad[index]]
        records.bad[indices] = True
        named += [records.name(index) for index in indices]
    if named:  # this run's log names them too, as the summary says
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        log.warning("skipping %d image(s) an earlier run of this data found undecodable: %s", len(named), shown)


def readable_count(records: Dataset) -> int:
    """How many of `records` evaluation scores: all but those found undecodable so far."""
    return len(records) - (records.unreadable if isinstance(records, DecodedRecords) else 0)


def evaluation_read(records: Dataset, index: int) -> tuple[Image.Image, int] | None:
    """What evaluation reads: the image itself, or None where it cannot be decoded (training's read takes the next
    readable image instead, which in an evaluation would count that image twice). A dataset of another kind (a
    wrapper around records) is read as it reads itself."""
    read = getattr(records, "decoded_or_none", None)
    return read(index) if read is not None else records[index]


def _decoded_splits(data: LoadedData) -> list[tuple[str, DecodedRecords]]:
    splits = (("train", data.train), ("val", data.val), ("unlabeled", data.unlabeled))
    return [(split, records) for split, records in splits if isinstance(records, DecodedRecords)]


def load_data(spec: DataSpec) -> LoadedData:
    """Resolve --data into train and validation records, and --unlabeled-data into extra training images."""
    if spec.source.lower() in (FASHION_MNIST, "fashion_mnist", "fmnist"):
        loaded = _load_fashion_mnist(spec)
    else:
        loaded = _load_folder(spec)
    if loaded.info.labeled and loaded.info.num_classes < 2:
        raise EdgekdError(f"--data {spec.source} has one class ({', '.join(loaded.info.class_names)}): a classifier "
                          "needs at least two class sub-folders (images without classes: one folder of loose "
                          "images, with a pretrained teacher)")
    loaded = _limit(loaded, spec)
    _warn_unvalidated_classes(loaded.info.class_names, loaded.train.labels, loaded.val.labels, spec.source)
    if not spec.unlabeled:
        return loaded
    labeled = [Path(path) for records in (loaded.train, loaded.val) for path in getattr(records, "paths", ())]
    unlabeled, skipped = _load_unlabeled(spec.unlabeled, labeled)
    info = replace(loaded.info, num_unlabeled=len(unlabeled), skipped_corrupt=loaded.info.skipped_corrupt + skipped)
    return LoadedData(info, loaded.train, loaded.val, unlabeled)


def _load_unlabeled(folders: Sequence[str], labeled_paths: Sequence[Path]) -> tuple[FileRecords, int]:
    """Every image under each folder, whatever its layout; any sub-folder names are ignored: no labels are read.
    A file is taken once, however many of the folders hold it, and not at all when it is one of the labeled images
    or a copy of one (the same bytes): a validation image trained on would make the accuracy guard and the report
    flatter."""
    labeled = {path.resolve() for path in labeled_paths}
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise EdgekdError(f"--unlabeled-data {folder} is not a folder; give a folder of images (any layout)")
        found = images_in(folder, recursive=True)
        if not found:
            raise EdgekdError(f"--unlabeled-data {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        paths += found
    unique: dict[Path, Path] = {}  # resolved -> as given, at each file's first mention
    for path in paths:
        unique.setdefault(path.resolve(), path)
    if len(unique) < len(paths):
        log.warning("--unlabeled-data: %d image(s) given more than once (overlapping folders or links) are taken once",
                    len(paths) - len(unique))
    paths = [path for resolved, path in unique.items() if resolved not in labeled]
    if len(paths) < len(unique):
        log.warning("--unlabeled-data: left out %d image(s) that are also in --data (its labeled and validation "
                    "images are used as such)", len(unique) - len(paths))
    if not paths:
        raise EdgekdError("--unlabeled-data holds only images that are in --data; give a folder of other images")
    keep = _identifiable_ones(paths, "--unlabeled-data")
    kept = [p for p, ok in zip(paths, keep) if ok]
    copies = _copies_of(kept, labeled_paths)
    if copies:
        log.warning("--unlabeled-data: left out %d image(s) with the same contents as images in --data (copies, "
                    "e.g. %s)", len(copies), kept[min(copies)])
        kept = [path for index, path in enumerate(kept) if index not in copies]
        if not kept:
            raise EdgekdError("--unlabeled-data holds only copies of images in --data; give a folder of other images")
    return FileRecords(kept, [UNLABELED] * len(kept)), keep.count(False)


def _copies_of(candidates: Sequence[Path], originals: Sequence[Path], head: int = 1 << 16) -> set[int]:
    """The indices of `candidates` whose bytes are those of one of `originals`. Sizes first (a stat each); files
    whose size the other side shares are told apart by their first `head` bytes, and those that still match are
    compared whole: a large folder is not read whole, and two pictures that share a size and a header (BMPs of one
    shape) are not taken for copies."""
    def size(path: Path) -> int | None:
        try:
            return os.stat(path).st_size
        except OSError:  # gone since it was listed: no copy of anything
            return None

    def start(path: Path) -> bytes | None:  # a digest of the first bytes: thousands are held at once
        try:
            with open(path, "rb") as handle:
                return hashlib.blake2b(handle.read(head), digest_size=16).digest()
        except OSError:
            return None

    if not candidates or not originals:
        return set()
    candidate_sizes, original_sizes = [size(p) for p in candidates], [size(p) for p in originals]
    shared = (set(candidate_sizes) & set(original_sizes)) - {None}
    alike: dict[tuple[int, bytes], list[Path]] = defaultdict(list)
    for path, length in zip(originals, original_sizes):
        if length in shared and (opening := start(path)) is not None:
            alike[(length, opening)].append(path)
    copies = set()
    for index, (path, length) in enumerate(zip(candidates, candidate_sizes)):
        if length not in shared or (opening := start(path)) is None:
            continue
        if any(_same_bytes(path, original) for original in alike.get((length, opening), ())):
            copies.add(index)
    return copies


def _same_bytes(one: Path, other: Path) -> bool:
    try:
        return filecmp.cmp(one, other, shallow=False)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

def fashion_mnist_root(root: Path | None) -> Path:
    candidates = [root] if root else [Path(os.environ["EDGEKD_FASHION_MNIST"])] \
        if os.environ.get("EDGEKD_FASHION_MNIST") else [FASHION_MNIST_DEFAULT_ROOT]
    for candidate in candidates:
        if candidate and (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate
    raise EdgekdError(
        f"Fashion-MNIST not found in {candidates[0]}: install it with `sudo apt-get install dataset-fashion-mnist` "
        "or point --fashion-mnist-root (compress, train-teacher) or EDGEKD_FASHION_MNIST (every command) at the "
        "folder holding the four *-idx*-ubyte.gz files")


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format): magic, dims, then raw uint8 data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(spec: DataSpec) -> LoadedData:
    root = fashion_mnist_root(spec.fashion_mnist_root)
    train = ArrayRecords(_read_idx(root / "train-images-idx3-ubyte.gz"), _read_idx(root / "train-labels-idx1-ubyte.gz"))
    val = ArrayRecords(_read_idx(root / "t10k-images-idx3-ubyte.gz"), _read_idx(root / "t10k-labels-idx1-ubyte.gz"))
    info = DatasetInfo(source=f"{FASHION_MNIST}:{root}", class_names=FASHION_MNIST_CLASSES, labeled=True,
                       num_train=len(train), num_val=len(val))
    return LoadedData(info, train, val)


# ---------------------------------------------------------------------------------------------- folders

# Split folders, in order of preference: `valid/` is Roboflow's, YOLO's and many Kaggle exports' name; `test/` only
# where there is no other.
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "valid", "validation", "test")
# What an archiver leaves beside the pictures: macOS zips' __MACOSX/, holding AppleDouble `._name.jpg` files
# (metadata with an image's extension, also found loose). Dot-folders are skipped too (_is_picture_folder).
_NOT_PICTURES = ("__MACOSX",)


def _is_picture_folder(name: str) -> bool:
    return not name.startswith(".") and name not in _NOT_PICTURES


def _is_picture_file(name: str) -> bool:
    return not name.startswith("._") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def tar_archives_in(folder: Path) -> list[Path]:
    """The .tar archives in a folder, sorted; not macOS's AppleDouble `._name.tar` (nor other dot-files), which
    timm's tar reader leaves out too."""
    return sorted(path for path in folder.glob("*.tar") if not path.name.startswith("."))


def _is_picture_member(path: str) -> bool:
    """A tar member that is a picture of the data set, not what archivers add: macOS tar's AppleDouble `._x.jpg`
    beside each file, `__MACOSX/` and dot-folders (as in folders, _is_picture_folder)."""
    *folders, name = path.split("/")
    return not name.startswith("._") and all(_is_picture_folder(part) for part in folders if part not in ("", "."))


def images_in(folder: Path, recursive: bool, fenced: Sequence[str] = ()) -> list[Path]:
    """Image files under `folder` by extension, sorted. os.walk's directory entries spare a stat per file, and sorting
    the strings before making Paths spares pathlib's slow comparisons (100k files: seconds). Linked folders are
    followed, each real folder once, except one leading back up (`up -> ..` would read every class into this one)
    or into a `fenced` folder (the other classes' real folders: their images would be read under two labels)."""
    if not recursive:
        with os.scandir(folder) as entries:
            found = [e.path for e in entries if e.is_file() and _is_picture_file(e.name)]
        return [Path(path) for path in sorted(found)]
    seen: set[str] = set()
    found, skipped = [], []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            skipped.append(root)
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for name in sorted(filter(_is_picture_folder, dirs)):  # sorted: which path reads a shared folder is fixed
            if not os.path.islink(os.path.join(root, name)):  # a real sub-folder lies inside this one: no check
                kept.append(name)
                continue
            target = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([real, target]) == target or \
                    any(os.path.commonpath([target, other]) == other for other in fenced):
                skipped.append(os.path.join(root, name))
            else:
                kept.append(name)
        dirs[:] = kept
        found += [os.path.join(root, name) for name in files if _is_picture_file(name)]
    if skipped:
        log.warning("%s: not following %d linked folder(s) that lead to a folder read already, to one above it or "
                    "to another class (e.g. %s)", folder, len(skipped), skipped[0])
    return [Path(path) for path in sorted(found)]


# The first bytes of the formats in IMAGE_EXTENSIONS (TIFF both byte orders, the binary and text PPM / PGM kinds).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
               b"P2", b"P3", b"P5", b"P6")


def _identifiable(path: Path) -> bool:
    """Is this an image file at all? Its first bytes are a known image signature (reading 12 bytes per file keeps a
    100k-image folder's start quick); an unknown one gets Pillow's header parser. Pixels are decoded when training
    reads them (FileRecords), where a truncated or damaged file is skipped and counted."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a file that is not an image; any means "skip it"
        return False


def _scan_split(folder: Path, class_names: tuple[str, ...] | None) -> tuple[list[Path], list[int], tuple[str, ...], int]:
    """Index one split folder: class sub-folders (labeled) or loose images (unlabeled). Corrupt files are skipped."""
    sub_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and _is_picture_folder(d.name))
    paths: list[Path] = []
    labels: list[int] = []
    if sub_dirs:
        names = tuple(d.name for d in sub_dirs)
        if class_names is not None:
            # one Unicode form for both splits: macOS and some zip tools write "é" as e + accent (NFD)
            known = {unicodedata.normalize("NFC", name): index for index, name in enumerate(class_names)}
            unknown = sorted(name for name in names if unicodedata.normalize("NFC", name) not in known)
            if unknown:
                raise EdgekdError(f"{folder} has class folders the training split lacks: {', '.join(unknown)}; "
                                  "use the same class folder names in train/ and val/")
            names = class_names
        else:
            known = {unicodedata.normalize("NFC", name): index for index, name in enumerate(names)}
            if len(known) < len(names):
                forms = [unicodedata.normalize("NFC", name) for name in names]
                twins = sorted(name for name, form in zip(names, forms) if forms.count(form) > 1)
                raise EdgekdError(f"{folder} has class folders whose names differ only in how their accents are "
                                  f"encoded (Unicode NFC / NFD): {', '.join(map(repr, twins))}; merge them into one")
        real_dirs = [os.path.realpath(d) for d in sub_dirs]
        for sub_dir, real in zip(sub_dirs, real_dirs):
            found = images_in(sub_dir, recursive=True, fenced=[other for other in real_dirs if other != real])
            if not found:
                raise EdgekdError(f"class folder {sub_dir} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                  "add images or remove the folder")
            paths += found
            labels += [known[unicodedata.normalize("NFC", sub_dir.name)]] * len(found)
        loose = images_in(folder, recursive=False)
        if loose:  # beside class folders an image has no label: say so rather than drop it unseen
            log.warning("ignored %d image(s) directly in %s, e.g. %s: a labeled folder holds its images in one "
                        "sub-folder per class", len(loose), folder, loose[0].name)
    else:
        names = ()
        paths = images_in(folder, recursive=False)
        labels = [UNLABELED] * len(paths)
    if not paths:
        raise EdgekdError(f"no images found in {folder}; point --data at a folder of images "
                          "(one sub-folder per class, or loose images for label-free distillation)")
    keep = _identifiable_ones(paths, str(folder))
    paths = [p for p, ok in zip(paths, keep) if ok]
    labels = [label for label, ok in zip(labels, keep) if ok]
    if names and class_names is None:
        present = set(labels)
        empty = [name for index, name in enumerate(names) if index not in present]
        if empty:  # only files that are not images: it would be a class the model can never learn
            raise EdgekdError(f"class folder {folder / empty[0]} holds no readable images (its files are not "
                              "images, named in the warning above); add images or remove the folder")
    return paths, labels, names, keep.count(False)


def _identifiable_ones(paths: list[Path], where: str) -> list[bool]:
    """Which of `paths` are images at all (_identifiable); the others are left out with one warning naming an
    example, and a folder where none is an image is an error."""
    keep = [_identifiable(p) for p in paths]
    if not all(keep):
        bad = [str(p) for p, ok in zip(paths, keep) if not ok]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        log.warning("skipped %d unreadable image(s) in %s: %s", len(bad), where, shown)
        if not any(keep):
            raise EdgekdError(f"every image in {where} is unreadable (e.g. {bad}); check the files")
    return keep


def _load_folder(spec: DataSpec) -> LoadedData:
    root = Path(spec.source).expanduser()
    if not root.exists():
        raise EdgekdError(f"data folder {root} does not exist; pass --data DIR (or --data fashion-mnist)")
    if root.is_file() and root.suffix.lower() == ".tar":
        return _load_archives(root, [root], spec)
    archives = tar_archives_in(root) if root.is_dir() else []
    if archives and not any(_is_picture_folder(p.name) if p.is_dir() else _is_picture_file(p.name)
                            for p in root.iterdir()):  # (a .git/ or an AppleDouble ._x.jpg beside them is neither)
        return _load_archives(root, archives, spec)
    if not root.is_dir():
        raise EdgekdError(f"--data {root} is not a folder or a .tar; pass a folder of images, a .tar of them, or "
                          "--data fashion-mnist")
    folders = {d.name.lower(): d for d in sorted(root.iterdir()) if d.is_dir() and _is_picture_folder(d.name)}
    train_dir = next((folders[name] for name in TRAIN_SPLITS if name in folders), None)
    val_dir = next((folders[name] for name in VAL_SPLITS if name in folders), None)
    if train_dir is not None and val_dir is not None:
        unused = [folders[name].name for name in VAL_SPLITS if name in folders and folders[name] != val_dir]
        if unused:
            log.info("validating on %s/; %s/ not used", val_dir.name, "/, ".join(unused))
        train_paths, train_labels, names, skipped_train = _scan_split(train_dir, None)
        val_paths, val_labels, _, skipped_val = _scan_split(val_dir, names if names else None)
        skipped = skipped_train + skipped_val
        train, val = FileRecords(train_paths, train_labels), FileRecords(val_paths, val_labels)
    else:
        _refuse_a_lone_split(root, list(folders.values()))
        paths, labels, names, skipped = _scan_split(root, None)
        train, val = _split(FileRecords(paths, labels), spec)
    info = DatasetInfo(source=str(root), class_names=names, labeled=bool(names), num_train=len(train),
                       num_val=len(val), skipped_corrupt=skipped)
    return LoadedData(info, train, val)


def _refuse_a_lone_split(root: Path, folders: list[Path]) -> None:
    """A train/ (or val/) folder of class folders without its partner would be read as one class named "train":
    say what is missing instead. Only where every folder is named like a split: beside other class folders, a
    class may well be called "train" (a vehicle) and hold its images in sub-folders."""
    if not folders or any(d.name.lower() not in TRAIN_SPLITS + VAL_SPLITS for d in folders):
        return
    splits = [d for d in folders if any(child.is_dir() and _is_picture_folder(child.name) for child in d.iterdir())]
    if not splits:
        return
    has_train = any(d.name.lower() in TRAIN_SPLITS for d in splits)
    missing = f"a validation folder beside it ({', '.join(f'{n}/' for n in VAL_SPLITS)})" if has_train else \
        f"a training folder beside it ({', '.join(f'{n}/' for n in TRAIN_SPLITS)})"
    raise EdgekdError(f"{root} holds {', '.join(d.name + '/' for d in splits)} with class folders inside but not "
                      f"{missing}; add it, or point --data at one folder of class folders (20% of each class is "
                      "then held out for validation)")


def _warn_unvalidated_classes(names: tuple[str, ...], train_labels: np.ndarray, val_labels: np.ndarray,
                              source: str) -> None:
    """A class with no validation image is never measured: neither the accuracy guard nor the report sees it."""
    if not names:
        return
    unseen = [names[c] for c in sorted(set(np.asarray(train_labels).tolist()) - set(np.asarray(val_labels).tolist()))]
    if unseen:
        log.warning("%s: no validation image for %d class(es) (%s): their accuracy is not measured; give each class "
                    "2 or more images (a validation folder: images of each class)", source, len(unseen),
                    ", ".join(unseen[:5]) + (" ..." if len(unseen) > 5 else ""))


def _load_archives(root: Path, archives: list[Path], spec: DataSpec) -> LoadedData:
    """Images in .tar archives, read in place (no unpacking), split 80/20 per class like a folder without train/ and
    val/. WebDataset shards (KEY.jpg + KEY.cls members; one .tar or a folder of them) by edgekd's shard index;
    otherwise timm's tar reader: one .tar with a folder per class inside (or loose images, unlabeled), or a folder
    holding one .tar per class. Each loader worker opens the archives itself (no file handle shared across forks)."""
    try:
        if _is_webdataset(archives[0]):
            records, names = _index_shards(archives)
        else:
            records, names = _timm_tar_records(root)
    except (tarfile.TarError, OSError, AssertionError) as error:
        raise EdgekdError(f"cannot read {archives[0]} as a tar archive ({first_line(error)}); give .tar files of "
                          "images") from error
    if len(records) == 0:
        raise EdgekdError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check the archive")
    train, val = _split(records, spec)
    info = DatasetInfo(source=str(root), class_names=names, labeled=bool(names), num_train=len(train),
                       num_val=len(val))
    return LoadedData(info, train, val)


def _split(records: Records, spec: DataSpec) -> tuple[Records, Records]:
    """Train and validation parts of a source without its own split: seeded, per class (stratified_split)."""
    train_idx, val_idx = stratified_split(records.labels, spec.val_fraction, spec.seed)
    return records.subset(train_idx), records.subset(val_idx)


def _timm_tar_records(root: Path) -> tuple[TarRecords, tuple[str, ...]]:
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    reader = ReaderImageInTar(str(root), cache_tarfiles=False)
    every_name = [name for name, _ in sorted(reader.class_name_to_idx.items(), key=lambda item: item[1])]
    members = [i for i, sample in enumerate(reader.samples) if _is_picture_member(sample[0].name)]
    targets = [int(reader.targets[i]) for i in members]
    used = sorted(set(targets))  # a class timm made of archiver files only (__MACOSX/...) is none
    names = tuple(every_name[index] for index in used)
    if names == ("",):  # loose images in one archive: no classes
        return TarRecords(reader, members, [UNLABELED] * len(members)), ()
    renumbered = {old: new for new, old in enumerate(used)}
    return TarRecords(reader, members, [renumbered[target] for target in targets]), names


WEBDATASET_LABEL = ".cls"


def _is_webdataset(archive: Path, look_at: int = 64) -> bool:
    """A WebDataset shard names its members KEY.EXT with the class in KEY.cls: look for one among the first."""
    with tarfile.open(archive, "r:") as handle:
        for count, member in enumerate(handle):
            if member.name.endswith(WEBDATASET_LABEL):
                return True
            if count >= look_at:
                break
    return False


def _index_shards(shards: list[Path]) -> tuple[ShardRecords, tuple[str, ...]]:
    """Every shard's members by header (tarfile seeks over the data), grouped by WebDataset key (the member's path up
    to the first dot of its file name): the image's offset and size, and the class index its .cls member holds."""
    entries, names, labels = [], [], []
    for number, shard in enumerate(shards):
        images: dict[str, tuple[int, int, str]] = {}
        classes: dict[str, int] = {}
        with tarfile.open(shard, "r:") as handle:
            for member in handle:
                if not member.isfile() or not _is_picture_member(member.name):
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, extension = base.partition(".")
                key = posixpath.join(folder, stem)
                if "." + extension == WEBDATASET_LABEL:
                    classes[key] = int(handle.extractfile(member).read().strip())  # type: ignore[union-attr]
                elif "." + extension.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    images.setdefault(key, (member.offset_data, member.size, member.name))
        for key, (offset, size, name) in images.items():
            if key not in classes:
                raise EdgekdError(f"{shard}: {name} has no {key}{WEBDATASET_LABEL} beside it; every sample of a "
                                  "WebDataset shard needs its class index")
            entries.append((number, offset, size))
            names.append(name)
            labels.append(classes[key])
    table = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
    count = max(labels) + 1 if labels else 0
    return ShardRecords(shards, table, names, labels), tuple(str(index) for index in range(count))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split; every class with 2+ images keeps at least one in each part."""
    if not 0.0 < val_fraction < 1.0:
        raise EdgekdError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels.tolist()):
        by_class[label].append(index)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in sorted(by_class):
        members = rng.permutation(by_class[label]).tolist()
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val_idx += members[:n_val]
        train_idx += members[n_val:]
    if not val_idx:
        raise EdgekdError("too few images to hold any out for validation; add images or a val/ folder")
    return sorted(train_idx), sorted(val_idx)


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """A seeded subset of `count` indices with the class balance of the whole."""
    if count >= len(labels):
        return list(range(len(labels)))
    _, chosen = stratified_split(labels, count / len(labels), seed)
    rng = np.random.default_rng(seed)
    if len(chosen) > count:  # per-class rounding overshot: trim at random, not from the last classes
        chosen = rng.permutation(chosen)[:count].tolist()
    elif len(chosen) < count:  # or undershot: top up at random from the rest
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = chosen + rng.permutation(rest)[:count - len(chosen)].tolist()
    return sorted(int(i) for i in chosen)


def _limit(loaded: LoadedData, spec: DataSpec) -> LoadedData:
    train, val = loaded.train, loaded.val
    if spec.max_train is not None:
        train = train.subset(stratified_subset(train.labels, spec.max_train, spec.seed))
    if spec.max_val is not None:
        val = val.subset(stratified_subset(val.labels, spec.max_val, spec.seed + 1))
    info = DatasetInfo(source=loaded.info.source, class_names=loaded.info.class_names, labeled=loaded.info.labeled,
                       num_train=len(train), num_val=len(val), skipped_corrupt=loaded.info.skipped_corrupt)
    return LoadedData(info, train, val)


# ---------------------------------------------------------------------------------------------- transforms

class ToMode:
    """Convert to the channel layout a model was built for: grayscale feeds a 3-channel model and vice versa."""

    def __init__(self, channels: int):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


def eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own deployment preprocessing (timm's eval transform: resize, center crop, normalize)."""
    return _timm_eval(pre, pixels_only=False)


def pixels_transform(pre: Preprocess) -> Callable[[Image.Image], np.ndarray]:
    """eval_transform up to its normalisation: the resized, cropped image as uint8 C x H x W (timm's eval transform
    in its prefetcher form, which leaves ToTensor and Normalize to the consumer)."""
    return _timm_eval(pre, pixels_only=True)


def _timm_eval(pre: Preprocess, pixels_only: bool) -> Callable[[Image.Image], torch.Tensor | np.ndarray]:
    return T.Compose([ToMode(pre.channels), create_transform(
        input_size=pre.input_size, is_training=False, interpolation=pre.interpolation, mean=pre.mean, std=pre.std,
        crop_pct=pre.crop_pct, crop_mode=pre.crop_mode, use_prefetcher=pixels_only)])


def _finish_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """After the shared augmentation: resize to this model's size and normalize with its statistics."""
    return T.Compose([ToMode(pre.channels), T.Resize(pre.image_size, interpolation=_interp(pre.interpolation)),
                      T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def _interp(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "nearest": T.InterpolationMode.NEAREST}.get(
        name, T.InterpolationMode.BILINEAR)


class ModelInputs(Dataset):
    """Records -> (input for model 0, input for model 1, ..., label).

    Training: one random crop + flip shared by all models (teacher and student must see the same view
    to distil), then each model's own resize and normalization. Eval: each model's timm eval transform.
    """

    def __init__(self, records: Dataset, preprocesses: Sequence[Preprocess], training: bool,
                 crop_scale: tuple[float, float] = (0.5, 1.0), *, evaluation: bool | None = None):
        """`training`: the shared random crop/flip and training's transform, else each model's eval transform.
        `evaluation` (default: not training): an undecodable image gives a placeholder that evaluate() leaves out;
        otherwise the next readable image takes its place (training, where distillation's fixed views use the eval
        transform: a black placeholder would be a picture the student learns from)."""
        self.records = records
        self.preprocesses = tuple(preprocesses)
        self.unique = tuple(dict.fromkeys(self.preprocesses))
        self.training = training
        self.evaluation = (not training) if evaluation is None else evaluation
        largest = max((p.image_size for p in self.unique), key=lambda hw: hw[0] * hw[1])
        self.augment = T.Compose([T.RandomResizedCrop(largest, scale=crop_scale), T.RandomHorizontalFlip()])
        make = _finish_transform if training else eval_transform
        self.per_model = {pre: make(pre) for pre in self.unique}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple:
        if self.evaluation:
            read = evaluation_read(self.records, index)
            if read is None:  # a placeholder that evaluate() leaves out
                return (*[torch.zeros(pre.input_size) for pre in self.preprocesses], UNREADABLE)
            image, label = read
        else:
            image, label = self.records[index]
        if self.training:
            image = self.augment(image)
        tensors = {pre: transform(image) for pre, transform in self.per_model.items()}
        return (*[tensors[pre] for pre in self.preprocesses], label)


def default_workers() -> int:
    """Leave one core for the training loop itself."""
    return min(6, max(0, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int | None = None,
                device: torch.device | None = None, drop_last: bool = False,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """A DataLoader with worker processes and, on CUDA, pinned memory, so loading is not the bottleneck."""
    workers = default_workers() if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=bool(device and device.type == "cuda"),
                      persistent_workers=workers > 0, generator=generator, drop_last=drop_last,
                      worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    # Seed numpy/random in each worker from torch's per-worker seed, so augmentation is reproducible.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
