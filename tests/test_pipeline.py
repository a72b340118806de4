"""`edgekd compress` end to end on real Fashion-MNIST with tiny timm models, its resumability, `edgekd bench`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.data import load_data
from edgekd.deploy.bundle import read_shipped_form
from edgekd.select.latency import LatencyStats
from edgekd.select.probe import TABLE_FORMAT
from edgekd.evaluate.report import SCHEMA_PATH
from edgekd.types import DataSpec
from tests.helpers.images import write_images
from tests.helpers.node import NODE, app_folder, node
from tests.helpers.user_images import write_truncated_jpeg

runner = CliRunner()

TINY = ["--teacher", "resnet18", "--random-init", "--data", "fashion-mnist", "--input-size", "32",
        "--max-train", "320", "--max-val", "120", "--teacher-epochs", "1", "--eval-images", "120",
        "--candidates", "lcnet_050,derived:resnet18:depth=0.5", "--workers", "0", "--batch-size", "32"]


def compress(run_dir: Path, *extra: str):
    result = runner.invoke(app, ["compress", *TINY, "--budget", "50ms", "--epochs", "1", "--out", str(run_dir),
                                 *extra])
    assert result.exit_code == 0, result.output
    return result


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.suffix in (".safetensors", ".onnx")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_root) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("compress") / "run"
    return run_dir, compress(run_dir).output


def test_compress_writes_a_report_a_bundle_and_a_verdict(run):
    run_dir, output = run
    assert "meets the 50.0 ms budget" in output and "Bundle:" in output
    assert output.index("student: ") < output.index("teacher resnet18 ready")  # chosen before the teacher is made
    assert "as outlined" not in output  # the outline (architecture, classes, size) was the teacher made
    report = json.loads((run_dir / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    summary = report["summary"]
    assert summary["student"] == "derived:resnet18:depth=0.5"  # the rule prefers the teacher-derived student
    assert summary["meets_budget"] and summary["student_p90_ms"] <= 50
    assert 0.0 <= summary["student_top1"] <= 1.0 and summary["teacher_agreement"] is not None
    fp32_row = {"student-fp32"} if summary["precision"] != "fp32" else set()  # an fp32 bundle is that row itself
    assert {m["role"] for m in report["bench"]["models"]} == {"teacher", "teacher-int8", "student"} | fp32_row
    assert [c["model"] for c in report["selection"]["candidates"] if c["chosen"]] == [summary["student"]]
    for name in ("model.onnx", "preprocess.json", "manifest.json"):
        assert (run_dir / "export" / name).is_file()
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    assert "| model | precision |" in (run_dir / "report.md").read_text()
    from edgekd.evaluate.report import summary_lines

    speed = f"the student's p50 is {summary['speedup_vs_teacher']:.1f}x faster"  # which figure the ratio compares
    assert speed in summary_lines(report)[0] and speed in output
    untimed = {**report, "summary": {**summary, "teacher_p50_ms": None, "speedup_vs_teacher": None}}
    assert "the teacher is not timed on this profile" in summary_lines(untimed)[0]  # a device table without it
    distillation = report["distillation"]
    # the default recipe (edgekd/recipe.py): losses by the student's start, fixed views with the teacher's answers
    # cached over this short schedule
    losses, line = (["ce=1", "kd=1"], "ce=1, kd=1 at T=4") if distillation["student_init"] != "random" else \
        (["ce=0.1", "kd=9(standardize=1)"], "ce=0.1, kd=9(standardize=1) at T=2")
    assert distillation["losses"] == losses and distillation["compute"] == "cpu, fp32"
    assert distillation["augment"] is False and distillation["teacher_cache"] is True
    line += ", fixed views (no crop/flip)"
    assert f"Distillation: losses {line}; student on cpu, fp32" in (run_dir / "report.md").read_text()


@pytest.mark.skipif(NODE is None, reason="this machine has no Node.js")
def test_an_app_that_knows_only_the_contract_answers_like_edgekd_predict(run, tmp_path: Path):
    """A fresh compress bundle in a Node app that knows only the raw-image contract: the same top-1 as
    `edgekd predict` on real images, or, as the bundle's own check counts it, a class `edgekd predict` scores within
    the bundle's tie margin of its top-1 (one level of a resized pixel decides such a near-tie: a suite run on an
    AMX host met one in 40)."""
    from edgekd.deploy.raw_input import tie_margin
    from edgekd.runtime import Predictor

    run_dir, _ = run
    folder = app_folder(run_dir / "export", tmp_path / "app", "contract.mjs")
    records = load_data(DataSpec("fashion-mnist", max_val=40)).val
    images = []
    for index in range(len(records)):
        images.append(tmp_path / f"{index}.png")
        records[index][0].save(images[-1])
    printed = runner.invoke(app, ["predict", str(folder), *map(str, images), "--top-k", "1"])
    assert printed.exit_code == 0, printed.output
    expected = [line.split(": ", 1)[1].rsplit(" ", 1)[0] for line in printed.output.splitlines()]
    answers = node(folder / "contract.mjs", folder / "model_with_preprocessing.onnx", folder / "preprocess.json",
                   *images)
    margin = tie_margin(read_shipped_form(run_dir / "export").precision)
    predictor = Predictor(folder)
    for image, answer, top1 in zip(images, answers, expected):
        if answer["label"] != top1:
            scores = dict(predictor.predict(str(image), top_k=len(predictor.labels)))
            assert scores[top1] - scores[answer["label"]] <= margin, (image, answer, scores)
    assert sum(a["label"] == top1 for a, top1 in zip(answers, expected)) >= len(images) - 1


def test_predict_answers_every_readable_image_and_names_the_others(run, tmp_path: Path):
    run_dir, _ = run
    good = tmp_path / "good.png"
    load_data(DataSpec("fashion-mnist", max_val=4)).val[0][0].save(good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "bad.png"), str(good), "-k", "2"])
    assert result.exit_code == 2 and "cannot read image" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith(f"{good}: ")]) == 1
    assert runner.invoke(app, ["predict", str(run_dir), str(good), "-k", "0"]).exit_code == 2  # at least one label
    student = runner.invoke(app, ["predict", str(run_dir / "distill"), str(good)])
    assert student.exit_code == 2 and "a trained student, not a bundle; make one with `edgekd export" in student.output
    # a folder: every image in it and its sub-folders, in order; a folder without images is said
    (tmp_path / "album" / "2024").mkdir(parents=True)
    shutil.copyfile(good, tmp_path / "album" / "2024" / "b.png")
    shutil.copyfile(good, tmp_path / "album" / "a.png")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "album"), str(tmp_path / "empty"), "-k", "1"])
    answered = [line.split(": ")[0] for line in result.output.splitlines() if ".png: " in line]
    assert answered == [str(tmp_path / "album" / "2024" / "b.png"), str(tmp_path / "album" / "a.png")], result.output
    assert result.exit_code == 2 and f"{tmp_path / 'empty'} holds no images" in result.output


def without_times(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("created", "seconds")}


def test_rerun_reuses_every_stage_and_a_changed_option_redoes_only_its_dependents(run, monkeypatch, tmp_path: Path):
    run_dir, _ = run
    before = mtimes(run_dir)
    stages = (run_dir / "stages.json").read_bytes()
    report = json.loads((run_dir / "report.json").read_text())
    again = compress(run_dir)
    assert all(f"{stage}: reusing" in again.output for stage in ("select", "distill", "export", "bench"))
    assert "measuring candidates" not in again.output  # the selection is a recorded stage: nothing is timed again
    assert mtimes(run_dir) == before and (run_dir / "stages.json").read_bytes() == stages  # no stage ran
    assert without_times(json.loads((run_dir / "report.json").read_text())) == without_times(report)

    compress(run_dir, "--max-accuracy-drop", "5", "--min-agreement", "50")
    after = mtimes(run_dir)
    assert after["distill/student.safetensors"] == before["distill/student.safetensors"]
    assert after["teacher/teacher.safetensors"] == before["teacher/teacher.safetensors"]
    assert after["export/model.onnx"] != before["export/model.onnx"]
    guard = json.loads((run_dir / "export" / "manifest.json").read_text())[0]["config"]["guard"]
    assert guard["max_accuracy_drop"] == 5 and guard["min_agreement"] == 0.5  # the percentage, as a share
    previous = json.loads((run_dir / "previous-report" / "report.json").read_text())
    assert without_times(previous) == without_times(report)  # the report of the bundle it replaced, kept aside

    # Other quantization code (an edgekd upgrade that rounds int8 weights differently, say) makes the bundle again
    # and reuses the training: the package version alone does not say the code changed.
    from edgekd import pipeline
    real = pipeline.code_digest
    monkeypatch.setattr(pipeline, "code_digest",
                        lambda package: real(package) + ("-changed" if package == "deploy" else ""))
    changed = compress(run_dir, "--max-accuracy-drop", "5", "--min-agreement", "50")
    assert "distill: reusing" in changed.output and "export: reusing" not in changed.output
    assert mtimes(run_dir)["export/model.onnx"] != after["export/model.onnx"]

    # a re-run that fails on the way leaves run.json describing the run whose report and bundle are in the folder
    failed = runner.invoke(app, ["compress", *TINY, "--budget", "0.001ms", "--epochs", "1", "--out", str(run_dir)])
    assert failed.exit_code == 2 and "no candidate fits" in failed.output, failed.output
    recorded = json.loads((run_dir / "run.json").read_text())["config"]
    assert recorded["budget"] == {"ms": 50, "speedup": None}
    assert recorded["max_accuracy_drop"] == 5 and recorded["min_agreement"] == 0.5
    report = json.loads((run_dir / "report.json").read_text())  # nothing was replaced: the report stays on top

    # a re-run killed while it replaces the bundle leaves no report beside a bundle it may not describe
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "bundle_from_checkpoint", killed)
    stopped = runner.invoke(app, ["compress", *TINY, "--budget", "50ms", "--epochs", "1", "--out", str(run_dir),
                                  "--max-accuracy-drop", "4"])
    assert stopped.exit_code == 130, stopped.output
    assert not any((run_dir / name).exists() for name in ("report.json", "report.md", "report.html", "bench.json"))
    assert (run_dir / "previous-report" / "bench.json").is_file()  # the figures that report shows, with it
    assert without_times(json.loads((run_dir / "previous-report" / "report.json").read_text())) == \
        without_times(report)  # moved whole, not lost
    monkeypatch.undo()
    compress(run_dir, "--max-accuracy-drop", "4")
    assert json.loads((run_dir / "report.json").read_text())["summary"]["student"] == report["summary"]["student"]

    # another budget (on a copy: the module's run keeps its 50 ms selection for the tests after this one): the
    # selection is made again and moves the report aside, but not bench.json, which the same student's models reuse
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    bench_written = (copy / "bench.json").stat().st_mtime_ns
    rechosen = compress(copy, "--max-accuracy-drop", "4", "--budget", "40ms")  # the last --budget counts
    assert "select: reusing" not in rechosen.output and "bench: reusing" in rechosen.output, rechosen.output
    assert (copy / "bench.json").stat().st_mtime_ns == bench_written
    assert (copy / "previous-report" / "report.json").is_file()
    assert json.loads((copy / "report.json").read_text())["summary"]["budget_ms"] == 40


def test_a_damaged_output_is_made_again_not_reused(run, tmp_path: Path):
    """A file of a finished run cut short (a crash, a full disk) or edited by hand is made again by the next run,
    never shipped or loaded as it is: each stage records its outputs' sha256 (the teacher, in teacher.json)."""
    from edgekd.artifacts import sha256_file

    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    compress(run_dir)  # (other tests re-run this folder with other options) every stage as these options make it
    model = run_dir / "export" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    result = compress(run_dir)
    assert "export/model.onnx changed since this run wrote it" in result.output
    assert "distill: reusing" in result.output and "export: reusing" not in result.output
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert all(entry["sha256"] == sha256_file(run_dir / "export" / entry["path"]) for entry in manifest)

    student = run_dir / "distill" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:5000])
    result = compress(run_dir)
    assert "distill/student.safetensors changed" in result.output and "distill: reusing" not in result.output

    teacher = run_dir / "teacher" / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:5000])
    result = compress(run_dir)
    assert "teacher.safetensors changed since it was written" in result.output
    assert "teacher resnet18: reusing" not in result.output


def test_another_teacher_in_the_same_run_folder_is_refused(run):
    run_dir, _ = run
    result = runner.invoke(app, ["compress", "--teacher", "test_vit", "--random-init", "--budget", "5ms",
                                 "--out", str(run_dir)])
    assert result.exit_code == 2 and "holds a run for" in result.output


def test_bench_a_run_folder(run, tmp_path: Path):
    run_dir, _ = run
    result = runner.invoke(app, ["bench", str(run_dir), "--threads", "1", "--eval-images", "60",
                                 "--out", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "bench.json").read_text())
    rows = len(json.loads((run_dir / "bench_models.json").read_text()))
    assert rows == (4 if read_shipped_form(run_dir / "export").precision != "fp32" else 3)
    assert len(measured["models"]) == rows and all(t["threads"] == 1 for t in measured["timings"])
    teacher = next(m for m in measured["models"] if m["role"] == "teacher")
    assert teacher["teacher_agreement"] == 1.0 and teacher["eval_images"] == 60
    # which images: another --eval-images is another sample, so the output says which (the run's report took its own)
    note = next(line for line in result.output.splitlines() if line.startswith("note: accuracy on"))
    assert note.startswith("note: accuracy on the validation images of fashion-mnist")
    assert note.endswith(": 60 images (stratified random 60 of 120, seed 0)")
    assert all(m["peak_rss_mb"] > m["model_rss_mb"] > 0 for m in measured["models"])
    assert runner.invoke(app, ["bench", str(run_dir), "--threads", "0"]).exit_code == 2  # said before timing

    # two runs on the same data are compared on its images; runs on different data ask for --data
    second = tmp_path / "second"
    shutil.copytree(run_dir, second)
    result = runner.invoke(app, ["bench", str(run_dir), str(second), "--threads", "1", "--eval-images", "30",
                                 "--out", str(tmp_path / "both.json")])
    assert result.exit_code == 0, result.output
    both = json.loads((tmp_path / "both.json").read_text())["models"]
    assert len(both) == 2 * rows and all(m["eval_images"] == 30 and m["top1"] is not None for m in both)
    recorded = json.loads((second / "run.json").read_text())
    recorded["config"]["data"]["max_val"] = 7
    (second / "run.json").write_text(json.dumps(recorded))
    result = runner.invoke(app, ["bench", str(run_dir), str(second), "--threads", "1"])
    assert result.exit_code == 2 and "made on different data; pass --data" in result.output, result.output


def test_bench_plain_onnx_files_and_bundles(run, tmp_path: Path):
    """Bare .onnx files, and a bundle put together by hand (no manifest), are labelled with the precision their
    graph holds (an int8 file is not called fp32)."""
    from edgekd.deploy.quantize import quantize_onnx

    run_dir, _ = run
    teacher = run_dir / "models" / "teacher.fp32.onnx"
    dynamic = quantize_onnx(teacher, tmp_path / "teacher.dynamic.onnx", "int8_dynamic", isa="avx2")
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    shutil.copy(run_dir / "export" / "preprocess.json", by_hand)
    shutil.copy(dynamic, by_hand / "model.onnx")
    result = runner.invoke(app, ["bench", str(teacher), str(run_dir / "models" / "teacher.int8.onnx"), str(dynamic),
                                 str(run_dir / "export"), str(by_hand), "--threads", "1",
                                 "--out", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    assert "teacher.fp32" in result.output and "export" in result.output
    precisions = {m["name"]: m["precision"] for m in json.loads((tmp_path / "bench.json").read_text())["models"]}
    assert precisions == {"teacher.fp32": "fp32", "teacher.int8": "int8_static", "teacher.dynamic": "int8_dynamic",
                          "export": read_shipped_form(run_dir / "export").precision, "by_hand": "int8_dynamic"}


def test_bench_rejects_a_corrupt_model(tmp_path: Path):
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    result = runner.invoke(app, ["bench", str(tmp_path / "broken.onnx")])
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output
    (tmp_path / "model.ort").write_bytes(b"ORTM")  # a bundle's mobile form is named as such, not called invalid
    result = runner.invoke(app, ["bench", str(tmp_path / "model.ort")])
    assert result.exit_code == 2 and "mobile form of model.onnx" in result.output, result.output


def test_killed_distillation_resumes_without_redoing_finished_stages(tmp_path: Path, fmnist_root):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "edgekd.cli", "compress", *TINY, "--budget", "50ms", "--epochs", "4",
               "--out", str(run_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state = run_dir / "distill" / "distill_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no distillation checkpoint in time"
    proc.send_signal(signal.SIGKILL)  # a crash, not a polite stop: nothing gets to clean up
    proc.wait()
    assert not (run_dir / "distill" / "student.json").exists()
    teacher_written = (run_dir / "teacher" / "teacher.safetensors").stat().st_mtime_ns

    selection = (run_dir / "selection.json").read_bytes()

    # on a re-run the candidates would be timed from scratch (an empty latency cache): the recorded choice stands
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "EDGEKD_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "reusing" in finished.stderr and "resuming" in finished.stderr.lower()
    assert "select: reusing" in finished.stderr and "measuring candidates" not in finished.stderr
    assert (run_dir / "selection.json").read_bytes() == selection
    assert (run_dir / "teacher" / "teacher.safetensors").stat().st_mtime_ns == teacher_written
    log = json.loads((run_dir / "distill" / "distill_log.json").read_text())
    assert [e["epoch"] for e in log["epoch_log"]] == [1, 2, 3, 4]


def test_a_new_teacher_checkpoint_in_the_same_run_redoes_the_teacher_and_distillation(run, tmp_path: Path):
    """`make demo` (a teacher trained here), then the same --out with the user's own checkpoint: the teacher and
    the student are made again from it, and the report names it."""
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    weights = load_file(str(run_dir / "teacher" / "teacher.safetensors"))
    own = tmp_path / "own.safetensors"  # the user's fine-tuned teacher: other weights, same architecture
    save_file({k: v * 1.05 if v.is_floating_point() else v for k, v in weights.items()}, str(own))
    before = mtimes(run_dir)
    args = [a for a in TINY if a != "--random-init"]
    result = runner.invoke(app, ["compress", *args, "--teacher-checkpoint", str(own), "--budget", "50ms",
                                 "--epochs", "1", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    after = mtimes(run_dir)
    for name in ("teacher/teacher.safetensors", "distill/student.safetensors", "export/model.onnx"):
        assert after[name] != before[name], name
    assert "distill: reusing" not in result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["teachers"][0]["weights"] == f"checkpoint:{own}"
    assert "select: reusing" in result.output  # same architecture, classes and budget: the same choice


def test_a_changed_data_folder_redoes_every_stage_from_the_teacher(tmp_path: Path, small_fmnist):
    labels = small_fmnist.train.labels
    keep = [i for c in range(3) for i in (labels == c).nonzero()[0][:20]]  # 60 images: enough to calibrate int8
    images, labels = small_fmnist.train.images[keep], labels[keep]
    folder = tmp_path / "shop"
    write_images(folder, images, labels, ("tshirt", "trouser", "pullover"))
    args = ["compress", "--teacher", "resnet18", "--random-init", "--data", str(folder), "--input-size", "32",
            "--teacher-epochs", "1", "--epochs", "1", "--candidates", "derived:resnet18:depth=0.5",
            "--workers", "0", "--batch-size", "8", "--budget", "50ms", "--out", str(tmp_path / "run")]
    assert runner.invoke(app, args).exit_code == 0
    before = mtimes(tmp_path / "run")
    Image.fromarray(images[0][::-1]).save(folder / "trouser" / "one_more.png")  # the user adds a picture
    write_truncated_jpeg(folder / "trouser" / "half_copied.jpg")  # and one cut short: found only when decoded
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    after = mtimes(tmp_path / "run")
    for name in ("teacher/teacher.safetensors", "distill/student.safetensors", "export/model.onnx"):
        assert after[name] != before[name], name
    assert "teacher resnet18: reusing" not in result.output and "distill: reusing" not in result.output
    skipped = json.loads((tmp_path / "run" / "report.json").read_text())["data"]["skipped_corrupt"]
    assert skipped == 1
    again = runner.invoke(app, args)  # every stage reused: nothing decodes the bad file, yet it is counted the same
    assert again.exit_code == 0 and "distill: reusing" in again.output, again.output
    assert json.loads((tmp_path / "run" / "report.json").read_text())["data"]["skipped_corrupt"] == skipped


def latency_row(model: str, precision: str, p90_ms: float) -> dict:
    stats = LatencyStats(p50_ms=0.9 * p90_ms, p90_ms=p90_ms, p99_ms=p90_ms, mean_ms=p90_ms, min_ms=0.8 * p90_ms,
                         std_ms=0.01, runs=50, warmup=10, threads=1, batch=1, providers=("CPUExecutionProvider",),
                         input_shape=(1, 3, 32, 32), session_ms=5.0, ort_version="device")
    return {"model_name": model, "precision": precision, "stats": stats.to_dict()}


def test_a_student_whose_int8_is_rejected_and_whose_fp32_misses_gives_way_to_the_next(tmp_path: Path, fmnist_root):
    """A device's latency table: the derived student (first by the rule) fits 3 ms only as int8 (1 ms; fp32 5 ms);
    lcnet_050 fits in both forms. A guard no int8 can pass rejects int8: edgekd must not ship a 5 ms model against a
    3 ms budget while another candidate fits; it distils and exports lcnet_050 and says why."""
    derived, lcnet = "derived:resnet18:depth=0.5", "lcnet_050"
    table = tmp_path / "latency_table.json"
    table.write_text(json.dumps({
        "format": TABLE_FORMAT, "version": 1, "teacher": "resnet18",
        "profile": {"name": "board", "providers": ["CPUExecutionProvider"], "threads": 1, "batch": 1,
                    "input_size": 32, "precisions": ["fp32", "int8_static"], "isa": "avx2", "latency": "probe"},
        "rows": [latency_row(derived, "int8_static", 1.0), latency_row(derived, "fp32", 5.0),
                 latency_row(lcnet, "int8_static", 2.0), latency_row(lcnet, "fp32", 2.5)]}))
    run_dir = tmp_path / "run"
    no_teacher = runner.invoke(app, ["compress", *TINY, "--profile", str(table), "--budget", "2x", "--epochs", "1",
                                     "--out", str(run_dir)])
    assert no_teacher.exit_code == 2 and "--budget 2x needs the teacher's own latency" in no_teacher.output
    assert not (run_dir / "teacher").exists()  # said before the teacher is fine-tuned
    raw = json.loads(table.read_text())
    table.write_text(json.dumps({**raw, "rows": [*raw["rows"], latency_row("resnet18", "fp32", 6.0)]}))
    # twice as fast as the teacher's 6 ms on the device: 3 ms
    result = runner.invoke(app, ["compress", *TINY, "--profile", str(table), "--budget", "2x", "--epochs", "1",
                                 "--max-accuracy-drop=-100", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "report.json").read_text())["summary"]
    assert summary["budget_ms"] == 3.0 and "resnet18's fp32 p90 6 ms on board / 2 = 3 ms" in summary["budget_source"]
    assert summary["student"] == lcnet and summary["precision"] == "fp32"
    models = json.loads((run_dir / "bench_models.json").read_text())
    assert [m["role"] for m in models].count("student") == 1 and "student-fp32" not in [m["role"] for m in models]
    assert summary["student_fp32_top1"] == summary["student_top1"] is not None  # the fp32 bundle is that model
    assert summary["student_p90_ms"] == 2.5 and summary["meets_budget"]  # the device's figure, not this machine's
    assert "latency table" in summary["latency_source"]
    [passed] = summary["passed_over"]
    assert passed["model_name"] == derived and passed["shipped_precision"] == "fp32" and passed["p90_ms"] == 5.0
    assert "fitted the budget as int8_static" in passed["why"] and f"Passed over: {derived}" in result.output
    again = runner.invoke(app, ["compress", *TINY, "--profile", str(table), "--budget", "2x", "--epochs", "1",
                                "--max-accuracy-drop=-100", "--out", str(run_dir)])
    assert again.exit_code == 0 and "distill: reusing" in again.output, again.output  # resumes from the second choice


def test_unlabeled_images_join_distillation_but_not_the_teacher(run, tmp_path: Path, small_fmnist):
    """--unlabeled-data: the same run folder with a folder of extra images (in class-named sub-folders, which must not
    be read as labels): the teacher is reused as it was (fine-tuned on the labeled images only), the student is
    distilled again on labeled + unlabeled images."""
    from edgekd.data import load_data, training_records
    from edgekd.types import DataSpec

    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    extra = tmp_path / "phone-dump"
    images, labels = small_fmnist.val.images[:40], small_fmnist.val.labels[:40]
    write_images(extra, images, labels, tuple(f"looks_like_class_{i}" for i in range(10)))
    loaded = load_data(DataSpec("fashion-mnist", max_train=320, max_val=120, unlabeled=(str(extra),)))
    records = training_records(loaded, labeled_repeat=2)
    assert loaded.info.num_unlabeled == 40 and len(records) == 2 * 320 + 40
    assert (records.labels[-40:] == -1).all() and (records.labels[:640] >= 0).all()
    assert records[len(records) - 1][1] == -1

    before = mtimes(run_dir)
    result = compress(run_dir, "--unlabeled-data", str(extra))
    after = mtimes(run_dir)
    assert after["teacher/teacher.safetensors"] == before["teacher/teacher.safetensors"]
    assert after["distill/student.safetensors"] != before["distill/student.safetensors"]
    assert "training on 320 labeled images (x1 per epoch) and 40 unlabeled ones" in result.output
    log = json.loads((run_dir / "distill" / "distill_log.json").read_text())
    assert log["unlabeled_images"] == 40 and log["train_images"] == 320
    assert json.loads((run_dir / "report.json").read_text())["data"]["num_unlabeled"] == 40


def test_a_ctrl_c_while_the_report_moves_aside_lands_after_every_file_has_moved(tmp_path: Path, monkeypatch):
    from edgekd import pipeline

    names = ("report.json", "report.md", "report.html", "bench.json")
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "previous-report").mkdir()
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(*args, **kwargs):  # Ctrl-C arrives as the moving begins
        os.kill(os.getpid(), signal.SIGINT)
        real_rmtree(*args, **kwargs)

    monkeypatch.setattr(pipeline.shutil, "rmtree", interrupted_rmtree)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline._retire_report(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in (tmp_path / "previous-report").iterdir()) == sorted(names)
    assert not any((tmp_path / name).exists() for name in names)
