"""`edgekd distill`: distillation on its own, on one or many GPUs (torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd.cli.app import app, user_errors
from edgekd.cli.options import (
    Augment,
    Flip,
    BatchSize,
    CacheTeacher,
    ChannelsLast,
    Data,
    Device,
    InputSize,
    LabeledRepeat,
    LearningRate,
    Losses,
    LossOptions,
    MaxTrain,
    MaxVal,
    Mix,
    MixAlpha,
    MixExtra,
    Precision,
    RandomInit,
    Seed,
    StudentCheckpointPath,
    StudentPretrained,
    TeacherCheckpoints,
    TeacherEpochs,
    TeacherPrecision,
    Teachers,
    Temperature,
    UnlabeledData,
    Workers,
    parse_input_size,
    _positive,
    check_model_names,
    check_not_replacing,
    student_choice,
    teacher_specs,
)
from edgekd.errors import EdgekdError
from edgekd.recipe import DEFAULT_MIX_ALPHA


def check_not_abandoning(out: Path, resume: bool, overwrite: bool) -> None:
    """--out is the student's own folder, not a teacher's. An interrupted distillation in --out (a training state
    newer than any finished student's card there) is continued with --resume or replaced with --overwrite, never
    dropped by a run that forgot --resume."""
    from edgekd.distill.state import STATE_NAME

    if (out / "teacher.json").is_file():
        raise EdgekdError(f"{out} is a teacher's folder (teacher.json): the student's files would mix with it; give "
                          "the student another --out")
    state, finished = out / STATE_NAME, out / "student.json"
    # a state newer than the finished student's card is a later run's, interrupted
    interrupted = state.is_file() and (not finished.is_file() or state.stat().st_mtime_ns > finished.stat().st_mtime_ns)
    if interrupted and not (resume or overwrite):
        raise EdgekdError(f"{out} holds an interrupted distillation ({STATE_NAME}); continue it with --resume, or "
                          "start over with --overwrite")


@app.command("distill")
@user_errors(resume="finished stages are kept; run the same command with --resume to continue from the checkpoint")
def distill_command(
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Student: a timm name or alias (or a "
                                          "derived name); may be implied by --student-checkpoint."),
    student_checkpoint: StudentCheckpointPath = None,
    student_pretrained: StudentPretrained = True,
    teacher: Teachers = [],
    teacher_checkpoint: TeacherCheckpoints = [],
    teacher_dir: list[Path] = typer.Option([], "--teacher-dir", help="A prepared teacher folder (teacher.json), "
                                           "e.g. from `edgekd train-teacher`. Repeatable."),
    random_init: RandomInit = False,
    data: Data = "fashion-mnist",
    unlabeled_data: UnlabeledData = [],
    labeled_repeat: LabeledRepeat = 1,
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="Folder for the student, its log and state."),
    loss: Losses = [],
    loss_option: LossOptions = [],
    epochs: Annotated[float, typer.Option("--epochs", callback=_positive("a number of epochs", "3"),
                                          help="Distillation epochs (fractions allowed).")] = 10.0,
    batch_size: BatchSize = 128,
    lr: LearningRate = None,
    temperature: Temperature = None,
    mix: Mix = None,
    mix_alpha: MixAlpha = DEFAULT_MIX_ALPHA,
    mix_extra: MixExtra = None,
    feature_pairs: Optional[str] = typer.Option(None, "--feature-pairs", help="STUDENT:TEACHER layer pairs, "
                                                "comma-separated (default: stage ends matched by relative depth)."),
    teacher_weighting: str = typer.Option("confidence", "--teacher-weighting", help="Several teachers: confidence "
                                          "(per sample) or mean."),
    augment: Augment = None,
    flip: Flip = None,
    cache_teacher: CacheTeacher = None,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a finished student of another model in --out, or an interrupted distillation "
        "there (with --resume: continue it where its settings match, else start over).")] = False,
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the student (pays off on CUDA)."),
    input_size: InputSize = None,
    teacher_epochs: TeacherEpochs = 2.0,
    max_train: MaxTrain = None,
    max_val: MaxVal = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    teacher_precision: TeacherPrecision = "auto",
    channels_last: ChannelsLast = None,
    seed: Seed = 0,
) -> None:
    """Distil the teacher(s) into the student. Runs on several GPUs when launched with torchrun."""
    import os

    from edgekd.data import load_data
    from edgekd.distill import DistillConfig, distill, parse_loss_specs
    from edgekd.distill.features import parse_feature_pairs
    from edgekd.distill.mixing import check_mix
    from edgekd.distill.students import initial_student
    from edgekd.distill.teacher import prepare_teachers, read_teacher_result
    from edgekd.distill.train import agreement_text
    from edgekd.types import DataSpec, TrainConfig

    if bool(teacher) == bool(teacher_dir):
        raise EdgekdError("give the teacher either by --teacher NAME or by --teacher-dir DIR (one of them)")
    check_model_names("--student", [student] if student else [])
    student, student_init = student_choice(student, student_checkpoint, student_pretrained)
    if student is None:
        raise EdgekdError("give the student: --student NAME (a timm name, alias or derived:<teacher>:depth=F), or "
                          "--student-checkpoint PATH")
    check_not_replacing(out / "student.json", student, "distilled student", overwrite)
    check_not_abandoning(out, resume, overwrite)
    if teacher and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EdgekdError("under torchrun, prepare the teacher once first (`edgekd train-teacher ... --out DIR`) "
                          "and pass --teacher-dir DIR")
    check_mix(mix, mix_alpha, mix_extra)  # before any teacher is loaded
    config = DistillConfig(losses=parse_loss_specs(loss, loss_option), temperature=temperature,
                           mix=mix, mix_alpha=mix_alpha, mix_extra=mix_extra,
                           feature_pairs=parse_feature_pairs(feature_pairs), teacher_weighting=teacher_weighting,
                           epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, labeled_repeat=labeled_repeat,
                           image_size=parse_input_size(input_size), augment=augment, flip=flip,
                           cache_teacher=cache_teacher, compile=compile_model, resume=resume,
                           start_over_if_changed=overwrite, num_workers=workers,
                           device=device, precision=precision, teacher_precision=teacher_precision,
                           channels_last=channels_last)
    specs = teacher_specs(teacher, teacher_checkpoint, random_init) if teacher else []
    loaded = load_data(DataSpec(source=data, seed=seed, max_train=max_train, max_val=max_val,
                                unlabeled=tuple(str(folder) for folder in unlabeled_data)))
    if specs:
        teachers = prepare_teachers(specs, loaded, out / "teacher", image_size=config.image_size,
                                    train_config=TrainConfig(epochs=teacher_epochs, batch_size=batch_size, seed=seed,
                                                             num_workers=workers, device=device, precision=precision,
                                                             channels_last=channels_last))
    else:
        teachers = [read_teacher_result(folder) for folder in teacher_dir]
    start = initial_student(student, teachers[0].num_classes, config.image_size or teachers[0].preprocess.image_size,
                            student_init, teacher_weights=teachers[0].weights_path, seed=seed)
    result = distill(teachers, student, loaded, config, out, start=start)
    if int(os.environ.get("RANK", "0")) == 0:
        accuracy = "n/a (no labels)" if result.val_top1 is None else f"top-1 {100 * result.val_top1:.2f}%"
        agreements = result.metrics["teacher_agreements"]  # distill() measures every teacher
        typer.echo(f"student {student}: validation {accuracy}, agreement with {agreement_text(teachers, agreements)} "
                   f"-> {result.weights_path} (log: {out / 'distill_log.json'})")
