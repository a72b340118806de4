"""compress(): the stages in order, in one resumable run folder.

    teacher -> select -> distill -> export (bundle) -> bench models -> bench -> report
                 ^                              |
                 +-- the shipped form misses the budget (int8 rejected): the next candidate

Each stage's key is made of its inputs' contents (edgekd.record): a stage whose key is unchanged and whose outputs
exist is reused, so re-running the same command continues where it stopped, and a changed input (weights, data,
options, versions) redoes that stage and what depends on it. Selection is a stage too: a re-run keeps its decision.
Teacher fine-tuning and distillation also resume mid-way from their training state.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgekd.artifacts import make_artifact, sha256_file, write_json_atomic
from edgekd.evaluate.bench import BENCH_MODELS_NAME, BenchModel, BenchResult, bench, bench_model_to_dict
from edgekd.evaluate.report import REPORT_FILES, build_report, write_reports
from edgekd.deploy.bundle import BUNDLE_FILES, BundleOptions, bundle_from_checkpoint, read_shipped_form
from edgekd.select.candidates import check_measurable_here, choose_student, resolve_budget
from edgekd.data import LoadedData, load_data, recall_unreadable, unreadable_marks
from edgekd.distill.train import DistillConfig, distill
from edgekd.errors import EdgekdError
from edgekd.interrupts import interrupts_held
from edgekd.select.profiles import DeviceProfile, load_profile
from edgekd.deploy import MAX_ACCURACY_DROP
from edgekd.deploy.guard import GuardConfig
from edgekd.record import StageRecord, code_digest, cpu_model, data_fingerprint, stage_key
from edgekd.select.rule import Budget, PassedOver, Selection, select_student
from edgekd.distill.students import StudentInit, initial_student, read_student_checkpoint, start_fingerprint
from edgekd.distill.teacher import NO_TEACHER, TeacherOutline, outline_teacher, prepare_teachers
from edgekd.types import DataSpec, StudentCheckpoint, TeacherResult, TeacherSpec, TrainConfig

log = logging.getLogger(__name__)

RUN_NAME = "run.json"
SELECTION_NAME = "selection.json"
BENCH_NAME = "bench.json"
UNREADABLE_NAME = "unreadable.json"  # images found undecodable, by index, with the data's fingerprint
PREVIOUS_REPORT = "previous-report"  # where a report goes once a stage starts replacing what it describes


@dataclass(frozen=True)
class CompressConfig:
    """Everything `edgekd compress` was asked for."""

    teachers: tuple[TeacherSpec, ...]
    budget: Budget  # in ms, or a speed-up over the teacher (resolved on the profile when selecting)
    out: Path
    data: DataSpec = DataSpec("fashion-mnist")
    profile: str = "host"
    image_size: tuple[int, int] | None = None
    student: str | None = None  # pin the student instead of selecting one
    candidates: tuple[str, ...] | None = None  # None: the whole pool plus the teacher-derived student
    student_init: StudentInit = StudentInit()  # where students start: pretrained (default), a checkpoint, random
    teacher_training: TrainConfig = TrainConfig()
    distillation: DistillConfig = DistillConfig()
    max_accuracy_drop: float = MAX_ACCURACY_DROP  # points of top-1 int8 / fp16 may lose against the fp32 student
    min_agreement: float | None = None  # share of images where int8/fp16 must keep the fp32 student's top-1; None: any
    calibration_method: str = "auto"  # int8 static: auto or one of quantize.CALIBRATION_METHODS (AUTO_CALIBRATION)
    search_quantization: bool = False
    eval_images: int | None = 2000  # validation images for quantization guard and bench accuracy


@dataclass(frozen=True)
class CompressResult:
    run_dir: Path
    selection: Selection
    teacher: TeacherResult
    student: StudentCheckpoint
    bundle_dir: Path
    bench: BenchResult
    report: dict[str, Any]


def compress(config: CompressConfig) -> CompressResult:
    """Teacher and budget in, a checked, benchmarked student bundle and a report out."""
    started = time.perf_counter()
    if not config.teachers:
        raise EdgekdError(NO_TEACHER)
    profile = load_profile(config.profile)  # bad input fails before anything is written
    check_measurable_here(profile)
    run_dir = Path(config.out)
    _check_out_folder(run_dir, config)
    data = load_data(config.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(run_dir, config)
    record = StageRecord.open(run_dir)
    _recall_unreadable(run_dir, data)
    log.info("data: %s, %d train / %d val images, %s", data.info.source, data.info.num_train, data.info.num_val,
             f"{data.info.num_classes} classes" if data.info.labeled else "no labels")

    # The student first: a budget that no candidate meets is said before the teacher's fine-tune (hours, maybe).
    # Every teacher is outlined, so that weights that are not at hand are said before the candidates are timed.
    outline = [outline_teacher(spec, data, config.image_size) for spec in config.teachers][0]
    selection = _select(config, record, run_dir, profile, outline)
    teachers = prepare_teachers(list(config.teachers), data, run_dir / "teacher", image_size=config.image_size,
                                train_config=config.teacher_training, run_dir=run_dir,
                                before_making=lambda: _retire_report(run_dir))
    teacher = teachers[0]
    if TeacherOutline.of(teacher) != outline:  # not expected; if it happens, the student fits the teacher made
        log.warning("the teacher came out as %s, not %s as outlined: choosing the student again",
                    TeacherOutline.of(teacher), outline)
        selection = _select(config, record, run_dir, profile, TeacherOutline.of(teacher))
    while True:
        student = _distill(config, record, run_dir, teachers, selection, data)
        _keep_unreadable(run_dir, data)  # what training found, for a re-run that reuses it
        bundle_dir, bundle_key = _export(config, record, run_dir, profile, student, data)
        following = _next_if_shipped_form_misses(config, record, run_dir, selection, bundle_dir)
        if following is None:
            break
        selection = following
    models = _bench_models(record, run_dir, profile, teacher, student, bundle_dir, bundle_key, data)
    bench_result = _bench(config, record, run_dir, profile, models, data)

    _keep_unreadable(run_dir, data)
    report = build_report(run_dir=run_dir, profile=profile, data=data, teachers=teachers, selection=selection,
                          student=student, bundle_dir=bundle_dir, bench=bench_result,
                          seconds=time.perf_counter() - started)
    write_reports(run_dir, report)
    _record_run(run_dir, config)
    return CompressResult(run_dir, selection, teacher, student, bundle_dir, bench_result, report)


def _check_out_folder(run_dir: Path, config: CompressConfig) -> None:
    """--out is a new or empty folder, or an earlier run's: compress rewrites what it finds there (export/,
    report.md, ...), so a folder of the user's own files is refused, as is one inside the images it reads."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgekdError(f"--out {run_dir} is a file; pass a folder (a new one, or an earlier run's)")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_NAME).exists():
        raise EdgekdError(f"--out {run_dir} holds files that are not an edgekd run (no {RUN_NAME}); pass a new or "
                          "empty folder, or an earlier run's folder to resume it")
    for source in (config.data.source, *config.data.unlabeled):
        folder = Path(source)
        if folder.is_dir() and run_dir.resolve().is_relative_to(folder.resolve()):
            raise EdgekdError(f"--out {run_dir} is inside the image folder {source}: the run's files would be read "
                              "as images; pass an --out outside it")


def _check_same_run(run_dir: Path, config: CompressConfig) -> None:
    """Record what this run folder is for; another teacher or data set in the same folder would mix results. The
    options are recorded here only for a new folder; after that, by a finished run (_record_run): run.json then
    describes the run whose report and bundle are in the folder, not an attempt that failed on the way."""
    path = run_dir / RUN_NAME
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("identity") != _identity(config):
            raise EdgekdError(f"{run_dir} holds a run for {previous.get('identity')}; pass another --out, "
                              "or remove the folder to start over")
    else:
        _record_run(run_dir, config)


def _identity(config: CompressConfig) -> dict[str, Any]:
    return {"teachers": [t.name for t in config.teachers], "data": config.data.source}


def _record_run(run_dir: Path, config: CompressConfig) -> None:
    write_json_atomic(run_dir / RUN_NAME, {"identity": _identity(config), "config": _jsonable(config)})


def _select(config: CompressConfig, record: StageRecord, run_dir: Path, profile: DeviceProfile,
            teacher: TeacherOutline) -> Selection:
    """Measured on the profile once; a re-run of the same command keeps the decision (selection.json) instead of
    timing again, so a run stopped half way through distillation continues with the same student."""
    path = run_dir / SELECTION_NAME
    init = config.student_init
    key = stage_key("select", {
        "teacher": teacher.model_name, "classes": teacher.num_classes, "size": teacher.image_size,
        # a relative budget is keyed as asked: the teacher's cached timing resolves it the same way again
        "budget_ms": config.budget.ms, **({"budget_speedup": config.budget.speedup} if config.budget.speedup else {}),
        "profile": _jsonable(profile), "student": config.student,
        "candidates": config.candidates, "pretrained": init.pretrained,
        "checkpoint": sha256_file(init.checkpoint) if init.checkpoint else None,
        # where the latencies come from: this machine's processor, or the device's table
        "latency": cpu_model() if profile.latency == "host" else
        sha256_file(profile.table_path) if profile.table_path else None})
    if record.fresh("select", key, path):
        selection = Selection.from_dict(json.loads(path.read_text()))
        log.info("select: reusing %s: %s (%s)", path, selection.chosen.model_name, selection.precision)
        return selection
    budget = resolve_budget(config.budget, teacher.model_name, profile, num_classes=teacher.num_classes,
                            image_size=teacher.image_size)
    selection = choose_student(teacher.model_name, budget.ms, profile, num_classes=teacher.num_classes,
                               image_size=teacher.image_size, student=config.student,
                               names=list(config.candidates) if config.candidates else None,
                               student_init=config.student_init)
    selection = replace(selection, budget_source=budget.source)
    best = selection.chosen.best
    _retire_report(run_dir, bench_too=False)  # the same student may come out: its bench may still be reused
    log.info("student: %s (%s, p90 %.3f ms against a %.3f ms budget): %s", selection.chosen.model_name,
             selection.precision, best.p90_ms if best else float("nan"), selection.budget_ms, selection.reason)
    write_json_atomic(path, selection.to_dict())
    record.done("select", key, path)
    return selection


def _next_if_shipped_form_misses(config: CompressConfig, record: StageRecord, run_dir: Path, selection: Selection,
                                 bundle_dir: Path) -> Selection | None:
    """The shipped form feeds back into selection: when the chosen student fitted the budget only in its int8 form
    and the accuracy guard rejected every int8 form (too much accuracy lost), the form that ships may be too slow;
    then the next candidate by the rule is taken instead (distilled and exported in turn). None: keep this one (it
    ships within the budget, it was pinned with --student, no other candidate fits, or an int8 form kept the
    accuracy and fp32 shipped because the guard, timing both side by side, found it at least as fast)."""
    shipped = read_shipped_form(bundle_dir)
    p90 = selection.p90_of(shipped.precision)
    if selection.pinned or shipped.precision == selection.precision or p90 is None or p90 <= selection.budget_ms:
        return None
    if shipped.int8_within_guard:
        log.info("%s ships %s: %s; its selection-time p90 (%.3f ms) is over the budget, but the guard's side-by-side "
                 "timing found it no slower than int8, so it stays", selection.chosen.model_name, shipped.precision,
                 shipped.reason, p90)
        return None
    passed = PassedOver(selection.chosen.model_name, shipped.precision, p90,
                        f"fitted the budget as {selection.precision}, but {shipped.precision} shipped "
                        f"(p90 {p90:.3f} ms > {selection.budget_ms:g} ms): "
                        f"{shipped.reason or 'the guard rejected int8'}")
    given_up = {p.model_name for p in selection.passed_over} | {passed.model_name}
    remaining = [v for v in selection.verdicts if v.candidate.model_name not in given_up]
    if not any(v.fits for v in remaining):
        log.warning("%s ships %s at p90 %.3f ms, over the %g ms budget, and no other candidate fits", passed.model_name,
                    shipped.precision, p90, selection.budget_ms)
        return None
    following = select_student([v.candidate for v in remaining], selection.budget_ms)
    log.warning("%s: %s; taking the next candidate, %s", passed.model_name, passed.why, following.chosen.model_name)
    following = replace(following, verdicts=selection.verdicts, passed_over=(*selection.passed_over, passed),
                        budget_source=selection.budget_source,
                        reason=f"{following.reason} (after {passed.model_name}: {passed.why})")
    write_json_atomic(run_dir / SELECTION_NAME, following.to_dict())  # same key: a re-run resumes from this choice
    record.rewrote("select", run_dir / SELECTION_NAME)
    return following


def _distill(config: CompressConfig, record: StageRecord, run_dir: Path, teachers: list[TeacherResult],
             selection: Selection, data: LoadedData) -> StudentCheckpoint:
    out_dir = run_dir / "distill"
    name = selection.chosen.model_name
    settings = replace(config.distillation, image_size=teachers[0].preprocess.image_size, resume=True,
                       start_over_if_changed=True)
    start_key = start_fingerprint(name, config.student_init, teacher_weights=teachers[0].weights_path)
    key = stage_key("distill", {"teachers": [sha256_file(t.weights_path) for t in teachers], "student": name,
                                "start": start_key, "config": settings.outcome_fields(),
                                "data": data_fingerprint(data)})
    if record.fresh("distill", key, out_dir / "student.json", out_dir / "student.safetensors"):
        log.info("distill: reusing %s", out_dir)
        return read_student_checkpoint(out_dir)
    _retire_report(run_dir)
    start = initial_student(name, teachers[0].num_classes, settings.image_size, config.student_init,
                            teacher_weights=teachers[0].weights_path, seed=settings.seed)
    checkpoint = distill(teachers, name, data, settings, out_dir, start=start)
    make_artifact(run_dir, "distill", checkpoint.weights_path, parent=str(teachers[0].weights_path),
                  config={"student": name, "epochs": settings.epochs, "student_init": start.source},
                  metrics={"val_top1": checkpoint.val_top1, "teacher_agreement": checkpoint.teacher_agreement})
    record.done("distill", key, out_dir / "student.json", checkpoint.weights_path)
    return checkpoint


def _export(config: CompressConfig, record: StageRecord, run_dir: Path, profile: DeviceProfile,
            student: StudentCheckpoint, data: LoadedData) -> tuple[Path, str]:
    bundle_dir = run_dir / "export"
    precisions = tuple(p for p in profile.precisions if p != "fp32")
    options = BundleOptions(isa=profile.isa, precisions=precisions, search=config.search_quantization,
                            guard=GuardConfig(max_accuracy_drop=config.max_accuracy_drop,
                                              min_agreement=config.min_agreement,
                                              calibration_method=config.calibration_method),
                            ort_format=profile.ort_format, threads=profile.threads,
                            time_models=profile.latency == "host", validation_images=config.eval_images,
                            latency_table=profile.table_path if profile.latency == "table" else None, overwrite=True)
    table = sha256_file(options.latency_table) if options.latency_table else None  # a re-probed device re-decides
    key = stage_key("export", {"student": sha256_file(student.weights_path), "options": _jsonable(options),
                               "table": table, "data": data_fingerprint(data),  # validation and calibration images
                               "files": sorted(BUNDLE_FILES),  # a bundle made before a file was added is made again
                               "code": code_digest("deploy")})  # nor is one quantized by other code reused
    if record.fresh("export", key, bundle_dir / "model.onnx", bundle_dir):
        log.info("export: reusing %s", bundle_dir)
        return bundle_dir, key
    _retire_report(run_dir)
    result = bundle_from_checkpoint(student, bundle_dir, data, options)
    make_artifact(run_dir, "export", bundle_dir / "model.onnx", parent=str(student.weights_path),
                  config={"precision": result.precision, "isa": profile.isa},
                  metrics={"parity_max_abs_diff": result.parity.max_abs_diff, "top1": result.shipped.top1})
    record.done("export", key, bundle_dir)
    return bundle_dir, key


def _bench_models(record: StageRecord, run_dir: Path, profile: DeviceProfile, teacher: TeacherResult,
                  student: StudentCheckpoint, bundle_dir: Path, bundle_key: str, data: LoadedData) -> list[BenchModel]:
    """Teacher fp32 + int8 and student fp32 as ONNX beside the shipped student, for side-by-side measurement."""
    from edgekd.evaluate.bench import models_from_paths
    from edgekd.evaluate.reference import export_reference_models

    folder = run_dir / "models"
    listing = run_dir / BENCH_MODELS_NAME
    key = stage_key("bench-models", {"teacher": sha256_file(teacher.weights_path),
                                     "student": sha256_file(student.weights_path), "bundle": bundle_key,
                                     "isa": profile.isa, "data": data_fingerprint(data)})
    if not record.fresh("bench-models", key, listing, folder):
        _retire_report(run_dir)
        models = export_reference_models(teacher, student, bundle_dir, folder, data, profile.isa)
        write_json_atomic(listing, [bench_model_to_dict(m, run_dir) for m in models])
        record.done("bench-models", key, listing, folder)
    return models_from_paths([run_dir])


def _bench(config: CompressConfig, record: StageRecord, run_dir: Path, profile: DeviceProfile,
           models: list[BenchModel], data: LoadedData) -> BenchResult:
    path = run_dir / BENCH_NAME
    threads = tuple(dict.fromkeys((1, profile.threads)))
    key = stage_key("bench", {"models": [sha256_file(m.path) for m in models], "threads": threads,
                              "eval": config.eval_images, "data": data_fingerprint(data),
                              "cpu": cpu_model()})  # timings are this machine's
    if record.fresh("bench", key, path):
        log.info("bench: reusing %s", path)
        return BenchResult.from_dict(json.loads(path.read_text()))
    _retire_report(run_dir)
    result = bench(models, data=data, threads=threads, max_eval_images=config.eval_images)
    write_json_atomic(path, result.to_dict())
    record.done("bench", key, path)
    return result


def _recall_unreadable(run_dir: Path, data: LoadedData) -> None:
    """The images an earlier run on the same data found undecodable count as found (data.recall_unreadable): a reused
    stage does not read them again, and the report's count of skipped images must not depend on which stages ran."""
    path = run_dir / UNREADABLE_NAME
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("data") == data_fingerprint(data):
            recall_unreadable(data, recorded["found"])


def _keep_unreadable(run_dir: Path, data: LoadedData) -> None:
    write_json_atomic(run_dir / UNREADABLE_NAME, {"data": data_fingerprint(data), "found": unreadable_marks(data)})


def _retire_report(run_dir: Path, bench_too: bool = True) -> None:
    """A stage is about to replace what the report at the top of the run folder describes (another student, bundle
    or figures): the report (and bench.json, whose figures it shows, which will be measured again) moves to
    previous-report/ first, so that a re-run stopped half way never leaves a report beside outputs it does not
    describe. The run's own report is written when it finishes; run.json, likewise written then, still describes
    the previous report's run."""
    names = (*REPORT_FILES, BENCH_NAME) if bench_too else REPORT_FILES
    reports = [run_dir / name for name in names if (run_dir / name).exists()]
    if not reports:
        return
    folder = run_dir / PREVIOUS_REPORT
    with interrupts_held():  # the files move together, or none does
        if any((run_dir / name).exists() for name in REPORT_FILES):  # a newer report: the one aside is superseded
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(exist_ok=True)  # else they join the report moved there earlier (bench.json after select)
        for path in reports:
            if (folder / path.name).exists():  # bench.json of a run that stopped before its report: not that one's
                path.unlink()
            else:
                path.replace(folder / path.name)
    log.info("the previous report moved to %s: this run replaces what it describes; its own report comes at the end",
             folder)


def _jsonable(value: Any) -> Any:
    """Dataclasses and paths as plain JSON values (for hashing and run.json)."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value

