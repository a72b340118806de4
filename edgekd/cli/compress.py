"""`edgekd compress`: the whole pipeline (edgekd.pipeline) in one command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd.cli.app import app, user_errors
from edgekd.errors import EdgekdError
from edgekd.cli.options import (
    BUDGET_HELP,
    PROFILE_HELP,
    Augment,
    Flip,
    BatchSize,
    CacheTeacher,
    Calibration,
    Candidates,
    ChannelsLast,
    Data,
    Device,
    FashionMnistRoot,
    InputSize,
    MaxAccuracyDrop,
    LabeledRepeat,
    LearningRate,
    Losses,
    LossOptions,
    MaxTrain,
    MaxVal,
    MinAgreement,
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
    _names,
    parse_input_size,
    _positive,
    check_model_names,
    student_choice,
    teacher_specs,
)
from edgekd.deploy import MAX_ACCURACY_DROP
from edgekd.recipe import DEFAULT_MIX_ALPHA


@app.command("compress")
@user_errors
def compress_command(
    teacher: Teachers,
    budget: str = typer.Option(..., "--budget", "-b", help=BUDGET_HELP),
    data: Data = "fashion-mnist",
    unlabeled_data: UnlabeledData = [],
    labeled_repeat: LabeledRepeat = 1,
    profile: str = typer.Option("host", "--profile", "-p", help=PROFILE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<teacher>-<budget>)."),
    student: Optional[str] = typer.Option(None, "--student", help="Pin the student instead of selecting one."),
    student_checkpoint: StudentCheckpointPath = None,
    student_pretrained: StudentPretrained = True,
    candidates: Candidates = None,
    teacher_checkpoint: TeacherCheckpoints = [],
    random_init: RandomInit = False,
    input_size: InputSize = None,
    teacher_epochs: TeacherEpochs = 2.0,
    epochs: Annotated[float, typer.Option("--epochs", callback=_positive("a number of epochs", "3"),
                                          help="Distillation epochs (fractions allowed).")] = 3.0,
    loss: Losses = [],
    loss_option: LossOptions = [],
    temperature: Temperature = None,
    mix: Mix = None,
    mix_alpha: MixAlpha = DEFAULT_MIX_ALPHA,
    mix_extra: MixExtra = None,
    augment: Augment = None,
    flip: Flip = None,
    cache_teacher: CacheTeacher = None,
    batch_size: BatchSize = 128,
    lr: LearningRate = None,
    max_accuracy_drop: MaxAccuracyDrop = MAX_ACCURACY_DROP,
    min_agreement: MinAgreement = None,
    search_quantization: bool = typer.Option(False, "--search-quantization",
                                             help="Try every quantization preset of the ISA, keep the fastest."),
    calibration: Calibration = "auto",
    max_train: MaxTrain = None,
    max_val: MaxVal = None,
    eval_images: int = typer.Option(2000, "--eval-images", min=1,
                                    help="Validation images for the int8 guard and bench."),
    fashion_mnist_root: FashionMnistRoot = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    teacher_precision: TeacherPrecision = "auto",
    channels_last: ChannelsLast = None,
    seed: Seed = 0,
) -> None:
    """Teacher + budget in; a distilled, quantized, checked student bundle and a report out. Resumable."""
    from edgekd.distill.losses import parse_loss_specs
    from edgekd.distill.mixing import check_mix
    from edgekd.distill.train import DistillConfig
    from edgekd.evaluate.report import summary_lines
    from edgekd.pipeline import CompressConfig, compress
    from edgekd.select.rule import parse_budget
    from edgekd.types import DataSpec, TrainConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would run the whole pipeline into one folder
        raise EdgekdError("compress runs as one process; on several GPUs run its distillation with torchrun: "
                          "`edgekd train-teacher`, then `torchrun ... -m edgekd.cli distill --teacher-dir DIR`, then "
                          "`edgekd export` (README, 'On several GPUs')")
    wanted = parse_budget(budget)
    specs = teacher_specs(teacher, teacher_checkpoint, random_init)
    check_model_names("--student", [student] if student else [])
    student, student_init = student_choice(student, student_checkpoint, student_pretrained)
    image_size = parse_input_size(input_size)
    run_dir = out or Path("runs") / f"{specs[0].name.split('.')[0]}-{budget.replace(' ', '')}"
    check_mix(mix, mix_alpha, mix_extra)  # before the teacher is fine-tuned
    config = CompressConfig(
        teachers=tuple(specs), budget=wanted, out=run_dir, profile=profile, image_size=image_size,
        student=student, student_init=student_init, candidates=tuple(_names(candidates) or ()) or None,
        max_accuracy_drop=max_accuracy_drop, calibration_method=calibration,
        min_agreement=min_agreement,
        search_quantization=search_quantization, eval_images=eval_images,
        data=DataSpec(source=data, fashion_mnist_root=fashion_mnist_root, seed=seed, max_train=max_train,
                      max_val=max_val,
                      unlabeled=tuple(str(folder) for folder in unlabeled_data)),
        teacher_training=TrainConfig(epochs=teacher_epochs, batch_size=batch_size, seed=seed, num_workers=workers,
                                     device=device, precision=precision, channels_last=channels_last),
        distillation=DistillConfig(losses=parse_loss_specs(loss, loss_option), temperature=temperature,
                                   mix=mix, mix_alpha=mix_alpha, mix_extra=mix_extra, augment=augment,
                                   flip=flip,
                                   cache_teacher=cache_teacher,
                                   epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, num_workers=workers,
                                   labeled_repeat=labeled_repeat,
                                   device=device,
                                   precision=precision, teacher_precision=teacher_precision,
                                   channels_last=channels_last))
    result = compress(config)
    for line in summary_lines(result.report):
        typer.echo(line)
    typer.echo(f"Report: {result.run_dir / 'report.html'} (also report.md, report.json)")
    typer.echo(f"Bundle: {result.bundle_dir} (edgekd predict {result.bundle_dir} IMAGE)")
