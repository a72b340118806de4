"""`edgekd train-teacher`: prepare a teacher on its own."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekd.cli.app import app, log, user_errors
from edgekd.cli.options import (
    BatchSize,
    ChannelsLast,
    Data,
    Device,
    Epochs,
    FashionMnistRoot,
    InputSize,
    LearningRate,
    MaxTrain,
    MaxVal,
    Overwrite,
    Precision,
    RandomInit,
    Seed,
    TeacherCheckpoints,
    Teachers,
    Workers,
    check_not_replacing,
    parse_input_size,
    teacher_specs,
)


@app.command("train-teacher")
@user_errors
def train_teacher_command(
    teacher: Teachers,
    data: Data = "fashion-mnist",
    out: Path = typer.Option(Path("runs/teacher"), "--out", "-o", help="Folder for the teacher's weights and log."),
    teacher_checkpoint: TeacherCheckpoints = [],
    random_init: RandomInit = False,
    input_size: InputSize = None,
    epochs: Epochs = 2.0,
    batch_size: BatchSize = 128,
    lr: LearningRate = None,
    max_train: MaxTrain = None,
    max_val: MaxVal = None,
    fashion_mnist_root: FashionMnistRoot = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    channels_last: ChannelsLast = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Load the teacher(s), fine-tune on the data when the head does not fit, report validation accuracy."""
    from edgekd.data import load_data, readable_count
    from edgekd.distill.teacher import RESULT_NAME, prepare_teachers
    from edgekd.models import resolve_model_name
    from edgekd.types import DataSpec, TrainConfig

    specs = teacher_specs(teacher, teacher_checkpoint, random_init)
    if len(specs) == 1:  # several teachers go to sub-folders named after each
        check_not_replacing(out / RESULT_NAME, resolve_model_name(specs[0].name), "teacher", overwrite)
    image_size = parse_input_size(input_size)
    loaded = load_data(DataSpec(source=data, fashion_mnist_root=fashion_mnist_root, seed=seed,
                                max_train=max_train, max_val=max_val))
    log.info("data: %s, %d train / %d val images, %s", loaded.info.source, loaded.info.num_train,
             loaded.info.num_val, f"{loaded.info.num_classes} classes" if loaded.info.labeled else "no labels")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, num_workers=workers, device=device,
                         precision=precision, channels_last=channels_last)
    results = prepare_teachers(specs, loaded, out, image_size=image_size, train_config=config)
    for result in results:
        accuracy = "n/a (no labels)" if result.val_top1 is None else \
            f"top-1 {100 * result.val_top1:.2f}%, top-5 {100 * (result.val_top5 or 0):.2f}%"
        typer.echo(f"teacher {result.model_name} ({result.params / 1e6:.2f}M params, input "
                   f"{'x'.join(map(str, result.preprocess.input_size))}, weights: {result.weights_source}"
                   f"{', fine-tuned' if result.fine_tuned else ''}): validation {accuracy} "
                   f"on {readable_count(loaded.val)} images -> {result.weights_path}")
