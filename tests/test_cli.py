"""The command line as a user meets it: help, version, a real run, and one-line errors for mistakes."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd import __version__
from edgekd.cli import app

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands_and_version():
    result = run_cli("--help")
    assert result.exit_code == 0 and "train-teacher" in result.output
    assert run_cli("--version").output.strip() == f"edgekd {__version__}"


def test_train_teacher_end_to_end(tmp_path: Path, fmnist_root):
    result = run_cli("train-teacher", "--teacher", "test_resnet", "--random-init", "--data", "fashion-mnist",
                     "--input-size", "32", "--epochs", "0.5", "--max-train", "400", "--max-val", "200",
                     "--workers", "0", "--out", str(tmp_path / "t"))
    assert result.exit_code == 0, result.output
    assert "validation top-1" in result.output and "on 200 images" in result.output
    assert (tmp_path / "t" / "teacher.safetensors").exists() and (tmp_path / "t" / "teacher.json").exists()
    # another teacher into the same --out replaces it only when asked to (as export's --overwrite); a student
    # likewise, where distill finished one
    written = (tmp_path / "t" / "teacher.safetensors").read_bytes()
    line = _one_line_error(["train-teacher", "--teacher", "test_vit", "--random-init", "--out", str(tmp_path / "t")])
    assert "holds a finished teacher (test_resnet)" in line and "--overwrite" in line
    assert (tmp_path / "t" / "teacher.safetensors").read_bytes() == written
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "student.json").write_text('{"model_name": "lcnet_050"}')
    line = _one_line_error(["distill", "--teacher-dir", str(tmp_path / "t"), "--student", "test_resnet",
                            "--out", str(tmp_path / "s")])
    assert "holds a finished distilled student (lcnet_050)" in line
    # the teacher's own folder as the student's --out: refused, the teacher's files untouched
    line = _one_line_error(["distill", "--teacher-dir", str(tmp_path / "t"), "--student", "test_resnet",
                            "--out", str(tmp_path / "t")])
    assert "is a teacher's folder" in line and "another --out" in line
    assert (tmp_path / "t" / "teacher.safetensors").read_bytes() == written


def _one_line_error(args: list[str], **how) -> str:
    """Run the installed console script as a user would; a mistake must be one line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "edgekd.cli", *args], capture_output=True, text=True, timeout=300,
                          **how)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_unknown_teacher_is_one_line_with_suggestions():
    assert "closest: vit_base" in _one_line_error(["train-teacher", "--teacher", "vit_bse", "--data", "x"])


def test_missing_data_folder_is_one_line(tmp_path: Path):
    line = _one_line_error(["train-teacher", "--teacher", "test_resnet", "--random-init",
                            "--data", str(tmp_path / "missing")])
    assert "does not exist" in line


def test_bad_checkpoint_is_one_line(tmp_path: Path):
    (tmp_path / "w.pth").write_bytes(b"garbage")
    line = _one_line_error(["train-teacher", "--teacher", "test_resnet", "--teacher-checkpoint", str(tmp_path / "w.pth"),
                            "--data", "fashion-mnist", "--max-train", "50", "--max-val", "20"])
    assert "cannot read checkpoint" in line
    import pytest

    from edgekd.errors import EdgekdError
    from edgekd.models import read_state_dict

    for junk, reason in ((b"eeee", "not a file torch.save wrote"), (b"", "empty or cut short"),
                         (b"PK\x03\x04junk", "a damaged archive")):
        (tmp_path / "junk.pth").write_bytes(junk)
        with pytest.raises(EdgekdError, match=reason):
            read_state_dict(tmp_path / "junk.pth")


def test_bad_input_size_is_one_line():
    assert "--input-size" in _one_line_error(["train-teacher", "--teacher", "test_resnet", "--input-size", "2"])


def test_bad_calibration_method_fails_while_parsing(tmp_path: Path):
    result = runner.invoke(app, ["compress", "--teacher", "resnet18", "--budget", "1ms", "--calibration", "median",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "minmax, average, entropy, percentile" in result.output
    assert not (tmp_path / "run").exists()


def test_an_agreement_floor_that_is_not_a_percentage_fails_while_parsing(tmp_path: Path):
    """`--min-agreement 0.95` read as 0.95% would pass anything; 150 could pass nothing: both say what to give."""
    for command in (["compress", "--teacher", "resnet18", "--budget", "1ms", "--out", str(tmp_path / "run")],
                    ["export", str(tmp_path / "student"), "--out", str(tmp_path / "bundle")]):
        for value in ("150", "0"):
            result = runner.invoke(app, [*command, "--min-agreement", value])
            assert result.exit_code == 2 and "is not a percentage of images" in result.output, result.output
            assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "bundle").exists()


def test_bad_labeled_repeat_fails_while_parsing(tmp_path: Path):
    """Not after the teacher was fine-tuned and the students timed: before anything is read or written."""
    result = runner.invoke(app, ["compress", "--teacher", "resnet18", "--budget", "1ms", "--labeled-repeat", "0",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--labeled-repeat" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_an_exception_without_a_message_still_makes_a_one_line_error():
    from edgekd.errors import first_line

    assert first_line(AssertionError()) == "AssertionError"  # timm's bare asserts: no IndexError, a name
    assert first_line(ValueError("  bad size\n  more detail")) == "bad size"
    assert first_line(RuntimeError("x" * 500), 160) == "x" * 160


def _class_folders(root: Path, classes: tuple[str, ...], per_class: int = 3) -> Path:
    import numpy as np

    from tests.helpers.images import write_images

    labels = np.repeat(np.arange(len(classes)), per_class)
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), 24, 24, 3), dtype=np.uint8)
    write_images(root, pixels, labels, classes)
    return root


def test_compress_never_writes_into_a_folder_of_the_users_files(tmp_path: Path):
    """compress rewrites what it finds in its run folder (export/, report.md): a folder that is not an edgekd run,
    a file, or a folder inside the images it reads is refused before anything is read or written."""
    images = _class_folders(tmp_path / "images", ("a", "b"))
    mine = tmp_path / "mine"
    (mine / "export").mkdir(parents=True)
    (mine / "export" / "notes.txt").write_text("precious")
    (tmp_path / "afile.txt").write_text("mine too")
    base = ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "20ms", "--data", str(images)]
    cases = {str(mine): "not an edgekd run", str(tmp_path / "afile.txt"): "is a file",
             str(images / "runs"): "inside the image folder"}
    for out, message in cases.items():
        result = runner.invoke(app, [*base, "--out", out])
        assert result.exit_code == 2 and message in result.output, result.output
    assert (mine / "export" / "notes.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == [
        "export"]
    assert (tmp_path / "afile.txt").read_text() == "mine too" and not (images / "runs").exists()


def test_one_class_is_refused_before_training(tmp_path: Path):
    """A single class trained to NaN and was blamed on the ONNX export; now it is refused when the data is read."""
    images = _class_folders(tmp_path / "images", ("only",))
    result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "20ms",
                                 "--data", str(images), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has one class (only)" in result.output, result.output
    assert not (tmp_path / "run" / "teacher").exists()
    # a profile measured on the device itself needs its table: said before the teacher is trained, not after
    images = _class_folders(tmp_path / "two", ("a", "b"))
    result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "20ms",
                                 "--data", str(images), "--profile", "phone-arm64", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "probe-pack" in result.output, result.output
    assert not (tmp_path / "run" / "teacher").exists()


def test_a_budget_no_student_meets_is_said_before_the_teacher_is_fine_tuned(tmp_path: Path):
    """Selection needs only the teacher's architecture, classes and input size: it runs first, so an impossible
    budget costs seconds, not the teacher's fine-tune."""
    images = _class_folders(tmp_path / "images", ("a", "b"))
    result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "1us",
                                 "--input-size", "32", "--candidates", "lcnet_050", "--data", str(images),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no candidate fits" in result.output, result.output
    assert not (tmp_path / "run" / "teacher").exists() and "fine-tuning teacher" not in result.output
    # and every teacher's weights are checked before the candidates are timed
    import torch

    from edgekd.models import create_model

    torch.save(create_model("test_resnet", 2).state_dict(), tmp_path / "good.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--teacher", "test_resnet", "--budget", "50ms",
                                 "--teacher-checkpoint", str(tmp_path / "good.pth"), "--teacher-checkpoint",
                                 str(tmp_path / "bad.pth"), "--input-size", "32", "--candidates", "lcnet_050",
                                 "--data", str(images), "--out", str(tmp_path / "two")])
    assert result.exit_code == 2 and "cannot read checkpoint" in result.output, result.output
    assert not (tmp_path / "two" / "selection.json").exists()
    # so is a checkpoint of another model, and a teacher that would need labels the data does not have
    torch.save(create_model("test_vit", 2).state_dict(), tmp_path / "vit.pth")
    loose = tmp_path / "loose"
    loose.mkdir()
    for image in list(images.rglob("*.png"))[:4]:
        (loose / image.name).write_bytes(image.read_bytes())
    for out, extra, message in (
            ("three", ["--teacher-checkpoint", str(tmp_path / "vit.pth"), "--data", str(images)], "does not fit"),
            ("four", ["--random-init", "--data", str(loose)], "the data has no labels")):
        result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--budget", "50ms", "--input-size", "32",
                                     "--candidates", "lcnet_050", *extra, "--out", str(tmp_path / out)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / out / "selection.json").exists()


def test_select_refuses_no_classes_and_an_empty_candidate_list():
    base = ["select", "--teacher", "resnet18", "--budget", "5ms"]
    for extra, message in ((["--num-classes", "0"], "--num-classes"), (["--candidates", ""], "names no candidate")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in _unboxed(result.output), result.output


def test_compress_under_torchrun_says_which_steps_take_it(tmp_path: Path, monkeypatch):
    """Each rank would run the whole pipeline into the same folder: refused before anything is read or written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "20ms",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "torchrun ... -m edgekd.cli distill" in result.output, result.output
    assert not (tmp_path / "run").exists()


def _unboxed(output: str) -> str:
    """typer's usage errors come in a box, wrapped to the terminal: the words, in one line."""
    return " ".join(output.replace("│", " ").split())


def test_typos_and_impossible_values_fail_while_parsing(tmp_path: Path):
    """Not after the teacher was fine-tuned and the candidates timed: a typo in --student or --candidates (with the
    closest names), epochs that are not positive, a device this machine lacks, and 0 for a count of images each
    name the option."""
    base = ["compress", "--teacher", "test_resnet", "--random-init", "--budget", "20ms", "--out", str(tmp_path / "r")]
    cases = [(["--student", "resnt18"], "closest: resnet18"), (["--candidates", "test_vit,mobilenetv3_smal_100"],
                                                               "mobilenetv3_small_100"),
             (["--epochs", "-1"], "--epochs"), (["--teacher-epochs", "0"], "--teacher-epochs"),
             (["--max-train", "0"], "--max-train"), (["--eval-images", "0"], "--eval-images")]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no GPU is visible"))
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in _unboxed(result.output), (extra, result.output)
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["distill", "--teacher", "test_resnet", "--student", "resnt18", "--out",
                                 str(tmp_path / "d")])
    assert result.exit_code == 2 and "closest: resnet18" in result.output


def test_a_bench_output_that_cannot_be_written_fails_before_the_benchmark(tmp_path: Path):
    (tmp_path / "afile.txt").write_text("mine")
    line = _one_line_error(["bench", str(tmp_path), "--out", str(tmp_path / "afile.txt" / "x.json")])
    assert "cannot be written" in line and (tmp_path / "afile.txt").read_text() == "mine"


def test_ctrl_c_while_the_command_line_loads_is_one_line():
    """The console script's imports (torch, timm, onnxruntime) take seconds; Ctrl-C then is not a traceback."""
    import signal
    import time

    # as from a terminal: a test run started in the background inherits SIGINT ignored, and so would the child
    proc = subprocess.Popen([sys.executable, "-c", "from edgekd.console import main; main()", "--help"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # inside the imports: once torch's library is mapped (seconds of importing remain); a fixed delay raced the
    # interpreter's own start on a loaded machine
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while maps.exists() and "libtorch" not in maps.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.01)
    if not maps.exists():
        time.sleep(1.0)  # no /proc (not Linux): well inside the imports on an idle machine
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted while starting" in stderr and "Traceback" not in stderr, stderr


def test_a_teacher_no_better_than_guessing_is_told_apart_from_a_weak_one():
    from edgekd.metrics import indistinguishable_from_chance

    assert indistinguishable_from_chance(1 / 3, 3, 12)  # the helper's 1-step Lite0: chance on 3 classes
    assert indistinguishable_from_chance(0.156, 10, 32)
    assert not indistinguishable_from_chance(0.25, 10, 300)  # weak, but it has learnt something
    assert not indistinguishable_from_chance(0.8695, 10, 2000) and not indistinguishable_from_chance(None, 10, 10)


def test_a_failure_inside_a_progress_bar_closes_it_before_the_message(monkeypatch):
    """Otherwise the bar, still open while its frame is in the traceback, is redrawn after the one-line error."""
    import typer
    from tqdm import tqdm

    from edgekd.cli.app import user_errors
    from edgekd.distill.train_utils import progress
    from edgekd.errors import EdgekdError

    bars, open_when_said = [], []
    monkeypatch.setattr(typer, "echo", lambda *args, **kwargs: open_when_said.append(
        bars[0] in getattr(tqdm, "_instances", set())))

    @user_errors
    def failing():
        bars.append(progress(None, total=10, desc="working"))  # updated by hand, as a measurement's bar is
        bars[0].update(3)
        raise EdgekdError("it went wrong")

    try:
        failing()
    except typer.Exit as exit_:
        assert exit_.exit_code == 2
    assert open_when_said == [False]


TEACHER_RUN = ["train-teacher", "--teacher", "test_resnet", "--random-init", "--data", "fashion-mnist", "--input-size",
               "32", "--epochs", "0.1", "--max-train", "200", "--max-val", "100", "--workers", "0"]
# A writer in Rust (safetensors) or C++ (torch's zip writer, given a path) says a failed write in its own words.
WRITE_THROUGH_A_LIBRARY = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from edgekd.artifacts import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    save_file({"w": torch.zeros(1 << 18)}, str(tmp)) if sys.argv[2] == "safetensors" else \
        torch.save({"w": torch.zeros(1 << 18)}, tmp)
"""


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past the limit fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_the_disk_cannot_take_is_one_line_naming_it(tmp_path: Path, fmnist_root):
    """A full disk, a quota or a size limit: the file that failed and what to do, not torch's "unexpected pos"."""
    line = _one_line_error([*TEACHER_RUN, "--out", str(tmp_path / "t")], preexec_fn=_file_size_limit(32 << 10))
    assert f"File too large: {tmp_path / 't' / 'train_state.pt'}" in line and "ulimit" in line, line
    proc = subprocess.run([sys.executable, "-c", WRITE_THROUGH_A_LIBRARY, str(tmp_path / "w.safetensors"),
                           "safetensors"], capture_output=True, text=True, preexec_fn=_file_size_limit(32 << 10))
    assert f"OSError: [Errno 27] File too large: '{tmp_path / 'w.safetensors'}'" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob(".w.safetensors*")) and not (tmp_path / "w.safetensors").exists()


@pytest.fixture()
def small_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root (CAP_SYS_ADMIN) on this machine")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_or_read_only_disk_is_one_line_naming_the_file(small_disk: Path, fmnist_root):
    line = _one_line_error([*TEACHER_RUN, "--out", str(small_disk / "t")])
    assert f"No space left on device: {small_disk / 't' / 'train_state.pt'}" in line and "free space" in line, line
    # torch given a path fails with "unexpected pos": told by the disk it left full
    proc = subprocess.run([sys.executable, "-c", WRITE_THROUGH_A_LIBRARY, str(small_disk / "w.pt"), "torch"],
                          capture_output=True, text=True)
    assert f"OSError: [Errno 28] No space left on device: '{small_disk / 'w.pt'}'" in proc.stderr, proc.stderr
    assert not list(small_disk.glob(".w.pt*"))
    # the teacher's answers, memory-mapped in its cache: numpy makes the files sparse, and a map written where the
    # disk has no room dies of SIGBUS; the blocks are reserved first, so it is the one-line error naming the setting
    shutil.rmtree(small_disk / "t", ignore_errors=True)
    teacher = small_disk.parent / "teacher"
    subprocess.run([sys.executable, "-m", "edgekd.cli", *TEACHER_RUN, "--out", str(teacher)], check=True,
                   capture_output=True)
    line = _one_line_error(["distill", "--teacher-dir", str(teacher), "--student", "test_resnet", "--data",
                            "fashion-mnist", "--input-size", "32", "--epochs", "0.1", "--max-train", "3000",
                            "--max-val", "50", "--workers", "0", "--out", str(small_disk.parent / "s")],
                           env={**os.environ, "EDGEKD_TEACHER_CACHE_DIR": str(small_disk / "cache")})
    assert "No space left on device" in line and str(small_disk / "cache") in line, line
    assert "EDGEKD_TEACHER_CACHE_DIR" in line and ".tmp" not in line, line
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    line = _one_line_error(["compress", "--teacher", "test_resnet", "--random-init", "--budget", "10ms",
                            "--out", str(small_disk / "run")])
    assert f"Read-only file system: {small_disk / 'run'}" in line and "--out" in line, line


def test_a_full_disk_says_which_setting_moves_the_file(monkeypatch, tmp_path: Path):
    """Most files are under --out; export's scratch folders are in TMPDIR and the teacher's answers in its cache."""
    import tempfile

    from edgekd.cli.app import _elsewhere

    monkeypatch.setenv("EDGEKD_TEACHER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert "EDGEKD_TEACHER_CACHE_DIR" in _elsewhere(str(tmp_path / "cache" / "abc" / "logits.npy"))
    assert "TMPDIR" in _elsewhere(str(tmp_path / "tmp" / "edgekd-export-x1" / "model.onnx"))
    assert "--out" in _elsewhere(str(tmp_path / "tmp" / "my-run" / "run.json"))  # a run folder the user put there


def test_a_derived_candidate_named_through_an_alias_is_the_one_selection_looks_for():
    """A probe pack made with `derived:efficientnet_lite0:...` measured the teacher-derived student under that
    name, and a later `select` (which names it canonically) found no row for it and chose another student."""
    from edgekd.cli.options import _candidate_names
    from edgekd.select.candidates import candidate_names

    given = _candidate_names("lcnet_050, derived:efficientnet_lite0:depth=0.5")
    assert given == "lcnet_050,derived:tf_efficientnet_lite0:depth=0.5"
    assert given.split(",")[1] in candidate_names("efficientnet_lite0")
