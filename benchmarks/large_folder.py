"""Start-up time and peak memory on a 100,000-image folder (made from Fashion-MNIST), with edgekd's defaults.

    python benchmarks/large_folder.py          # ~4 min on the 2-core host (about 1 min of it writing the folder)

The folder: the 70,000 Fashion-MNIST images, plus 30,000 of them mirrored, as PNG files in one sub-folder per
class (no train/val split: edgekd makes a stratified 80/20 one). The same images also as 100 WebDataset shards
(KEY.png + KEY.cls), which edgekd indexes once and reads in place. Each measurement runs in its own process (peak RSS
from getrusage); the files are in the page cache (written just before), as on a second run.

- `load_data`: reading the folder (the listing, 12 bytes of each file, the stratified split), imports excluded;
- `data fingerprint`: the run record's identity of the data (every file's path, size, mtime);
- `first batch`: from process start (torch and timm imports included) to the first augmented 224 px training batch
  of 128 out of the DataLoader (default workers);
- `train-teacher`: `edgekd train-teacher` start to finish on the whole folder, 4 optimizer steps at 32 px, with its
  validation pass over all 20,000 held-out images;
- the previous scan, for comparison: PIL's verify() of every file in one thread (what edgekd did before; it
  decodes nothing either, but 100k PNG headers and checksums in Python). edgekd now reads 12 bytes per file.

Results: benchmarks/results/large_folder.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COUNT = 100_000
PEAK = ("\nimport resource\nprint('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")

STEPS = {
    "load_data": """
import time
from edgekd.data import load_data; from edgekd.types import DataSpec
started = time.perf_counter()
data = load_data(DataSpec(FOLDER))
print('SECONDS', time.perf_counter() - started, data.info.num_train, data.info.num_val)
""",
    "data fingerprint": """
from edgekd.data import load_data; from edgekd.types import DataSpec; from edgekd.record import data_fingerprint
import time
data = load_data(DataSpec(FOLDER))
started = time.perf_counter()
data_fingerprint(data)
print('SECONDS', time.perf_counter() - started)
""",
    "first batch": """
import time; started = time.perf_counter()
from edgekd.data import ModelInputs, load_data, make_loader; from edgekd.types import DataSpec, Preprocess
data = load_data(DataSpec(FOLDER))
pre = Preprocess((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'bicubic', 0.875)
loader = make_loader(ModelInputs(data.train, [pre, pre], training=True), 128, shuffle=True)
images, _, labels = next(iter(loader))
print('SECONDS', time.perf_counter() - started, tuple(images.shape))
""",
    "load_data, WebDataset shards (100 x 1,000 images)": """
import time
from edgekd.data import load_data; from edgekd.types import DataSpec
started = time.perf_counter()
data = load_data(DataSpec(SHARDS))
print('SECONDS', time.perf_counter() - started, data.info.num_train, data.info.num_val)
""",
    "previous scan (PIL verify, one thread)": """
import time
from pathlib import Path
from PIL import Image
started = time.perf_counter()
for path in sorted(p for p in Path(FOLDER).rglob('*.png')):
    with Image.open(path) as image:
        image.verify()
print('SECONDS', time.perf_counter() - started)
""",
}


def _write(args: tuple[Path, np.ndarray, list[str]]) -> None:
    from PIL import Image

    folder, images, names = args
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)


def _write_shard(args: tuple[Path, np.ndarray, np.ndarray, int]) -> None:
    import io
    import tarfile

    from PIL import Image

    path, images, labels, first = args
    with tarfile.open(path, "w") as shard:
        for offset, (image, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            for extension, payload in (("png", buffer.getvalue()), ("cls", str(int(label)).encode())):
                info = tarfile.TarInfo(f"{first + offset:06d}.{extension}")
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))


def make_folder(root: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from edgekd.data import FASHION_MNIST_CLASSES, load_data
    from edgekd.types import DataSpec

    data = load_data(DataSpec("fashion-mnist"))
    images = np.concatenate([data.train.images, data.val.images])
    labels = np.concatenate([data.train.labels, data.val.labels])
    extra = COUNT - len(images)
    images = np.concatenate([images, images[:extra, :, ::-1]])
    labels = np.concatenate([labels, labels[:extra]])
    jobs = []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        folder = root / name.replace("/", "-")
        folder.mkdir(parents=True)
        members = np.flatnonzero(labels == label)
        for chunk in np.array_split(members, 8):
            jobs.append((folder, images[chunk], [f"img_{i:06d}.png" for i in chunk]))
    shards = root.with_name("shards")
    shards.mkdir()
    shard_jobs = [(shards / f"shard-{n:06d}.tar", images[n * 1000:(n + 1) * 1000], labels[n * 1000:(n + 1) * 1000],
                   n * 1000) for n in range(COUNT // 1000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write, jobs))
        list(pool.map(_write_shard, shard_jobs))


def run(code: str, folder: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = code.replace("FOLDER", repr(str(folder))).replace("SHARDS", repr(str(folder.with_name("shards"))))
    command = [sys.executable, *args] if args else [sys.executable, "-c", code + PEAK]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {"wall_s": wall, "stdout": done.stdout}, done.stderr


def peak_gb(stdout: str) -> tuple[float, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    own, children = (int(v) for v in line.split()[1:3])
    return round(own / 2**20, 2), round(children / 2**20, 2)


def main() -> None:
    out = ROOT / "benchmarks" / "results" / "large_folder"
    work = Path(tempfile.mkdtemp(prefix="edgekd-large-"))
    try:
        started = time.perf_counter()
        # in its own process: this one stays small (a child's peak RSS counts from its parent's at fork)
        subprocess.run([sys.executable, __file__, "--make-folder", str(work / "images")], check=True, cwd=ROOT)
        written = time.perf_counter() - started
        print(f"wrote {COUNT} images in {written:.0f} s", flush=True)
        rows = []
        for name, code in STEPS.items():
            result, _ = run(code, work / "images")
            seconds_line = next(line for line in result["stdout"].splitlines() if line.startswith("SECONDS"))
            own, children = peak_gb(result["stdout"])
            rows.append({"step": name, "seconds": round(float(seconds_line.split()[1]), 2),
                         "process_wall_s": round(result["wall_s"], 1), "peak_rss_gb": own,
                         "loader_workers_peak_rss_gb": children, "detail": " ".join(seconds_line.split()[2:])})
            print(rows[-1], flush=True)
        teacher = ("import sys, time; started = time.perf_counter()\nfrom edgekd.cli import app\n"
                   "sys.argv = ['edgekd', 'train-teacher', '--teacher', 'resnet18', '--random-init', '--data', FOLDER,"
                   " '--input-size', '32', '--epochs', '0.0064', '--out', OUT]\n"
                   "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                   "print('SECONDS', time.perf_counter() - started)\n").replace("OUT", repr(str(work / "teacher")))
        result, stderr = run(teacher, work / "images")
        own, children = peak_gb(result["stdout"])
        seconds = float(next(line for line in result["stdout"].splitlines() if line.startswith("SECONDS")).split()[1])
        rows.append({"step": "train-teacher (4 steps at 32 px, then validation on 20,000 images)",
                     "seconds": round(seconds, 1), "process_wall_s": round(result["wall_s"], 1), "peak_rss_gb": own,
                     "loader_workers_peak_rss_gb": children, "detail": ""})
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python benchmarks/large_folder.py", "images": COUNT, "cpu_count": os.cpu_count(),
              "folder_written_s": round(written, 1), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"<!-- Made by `{result['command']}` on the {os.cpu_count()}-core dev host. -->", "",
             f"# A {COUNT:,}-image folder (Fashion-MNIST as PNG files, one sub-folder per class)", "",
             "Each step in its own process, files in the page cache. `seconds`: the step itself; `process`: the "
             "whole process including Python and torch imports; peak RSS of the process (DataLoader workers are "
             "forked from it and share its pages; getrusage cannot tell their own peak apart, so it is left out).",
             "", "| step | seconds | process s | peak RSS GB | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']} | {r['process_wall_s']} | {r['peak_rss_gb']:.2f} | {r['detail']} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-folder"]:
        make_folder(Path(sys.argv[2]))
    else:
        main()
