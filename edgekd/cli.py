"""The `edgekd` command line: thin typer wrappers that parse options and call plain functions."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from edgekd import __version__
from edgekd.errors import EdgekdError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a big timm image model into a small ONNX model that fits a latency budget.")

log = logging.getLogger("edgekd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="edgekd: %(message)s",
                        stream=sys.stderr, force=True)


def user_errors(func: Callable) -> Callable:
    """User mistakes become one line on stderr and exit code 2; an interrupt (Ctrl-C or SIGTERM) says how to resume."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt():
                return func(*args, **kwargs)
        except EdgekdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished stages are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`kill`, torchrun and job schedulers stop a run with SIGTERM: handle it like Ctrl-C, so distillation writes
    its checkpoint (mid-epoch) before the process ends and `--resume` / a re-run continues from there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------- shared options
# Options that several commands take, declared once (typer reads the option from the Annotated type).

def _teacher_help() -> str:
    from edgekd.models import alias_help

    return f"timm model name or alias ({alias_help()}). Repeat for several teachers."


DATA_HELP = ("Images: a folder with one sub-folder per class (train/ and val/ or test/ used when present), "
             "a folder of unlabeled images, or 'fashion-mnist'.")

Teachers = Annotated[list[str], typer.Option("--teacher", "-t", help=_teacher_help())]
TeacherCheckpoints = Annotated[list[Path], typer.Option(
    "--teacher-checkpoint", help="A state_dict (.safetensors or .pth) per --teacher, loaded safely.")]
RandomInit = Annotated[bool, typer.Option("--random-init", help="Teacher(s) from random weights, trained here.")]
TeacherEpochs = Annotated[float, typer.Option("--teacher-epochs", help="Epochs when the teacher needs fine-tuning.")]
Data = Annotated[str, typer.Option("--data", "-d", help=DATA_HELP)]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Side in pixels (default: the teacher's).")]
MaxTrain = Annotated[Optional[int], typer.Option("--max-train", help="Use a stratified subset of training images.")]
MaxVal = Annotated[Optional[int], typer.Option("--max-val", help="Use a stratified subset of validation images.")]
FashionMnistRoot = Annotated[Optional[Path], typer.Option("--fashion-mnist-root", help="Where the idx files are.")]
Epochs = Annotated[float, typer.Option("--epochs", help="Training epochs (fractions allowed).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Global batch, split across torchrun processes.")]
LearningRate = Annotated[Optional[float], typer.Option(
    "--lr", help="Peak learning rate of the head (AdamW, warm-up + cosine; in compress: of distillation). Default: "
    "from real weights 4e-3 for CNNs and 5e-4 x batch/256 for transformers, with the backbone's layers at rates decaying "
    "with depth (timm's layer-wise decay); from random weights 2e-3 for every layer.")]
Losses = Annotated[list[str], typer.Option(
    "--loss", help="name=weight or name=start:end (ramped over training), repeatable; known: ce, kd, dkd, wsl, "
    "fitnet, at, rkd, sp. Default: ce=1 kd=1 (no ce without labels).")]
LossOptions = Annotated[list[str], typer.Option(
    "--loss-option", help="A loss's constant as LOSS.KEY=VALUE, repeatable: dkd.alpha, dkd.beta (default 1, 8), "
    "rkd.distance, rkd.angle (default 1, 2).")]
Temperature = Annotated[float, typer.Option("--temperature", help="Softmax temperature of kd and dkd.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader processes (default: cores - 1).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's GPU).")]
def _precision(value: str) -> str:
    """Checked while parsing, so a typo fails before any data is read."""
    from edgekd.train_utils import PRECISIONS

    if value not in PRECISIONS:
        raise typer.BadParameter(f"{value!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    return value


Precision = Annotated[str, typer.Option("--precision", callback=_precision, help="Training precision: auto (bf16 "
                                        "autocast on CUDA, fp32 on CPU), bf16 or fp32.")]
TeacherPrecision = Annotated[str, typer.Option("--teacher-precision", callback=_precision, help="The teacher's "
                                               "forward pass: auto (bf16 on CUDA and on CPUs with native bf16, else "
                                               "fp32), bf16 or fp32.")]
ChannelsLast = Annotated[Optional[bool], typer.Option(
    "--channels-last/--no-channels-last", help="Memory layout of training (default: channels_last on CUDA).")]
Seed = Annotated[int, typer.Option("--seed")]
StudentPretrained = Annotated[bool, typer.Option(
    "--student-pretrained/--no-student-pretrained", help="Start timm students from timm's pretrained weights "
    "(local Hugging Face cache or hub; offline with none cached: random, said in the log and report) and derived "
    "students from the teacher's. Off: every student starts from random weights.")]
StudentCheckpointPath = Annotated[Optional[Path], typer.Option(
    "--student-checkpoint", help="Start the student from this state_dict (.safetensors or .pth, loaded safely; "
    "the classifier is re-initialised when its class count differs). Pins the student: --student, or the "
    "architecture the file names.")]
def _calibration(value: str) -> str:
    from edgekd.quantize import CALIBRATION_CHOICES

    if value not in CALIBRATION_CHOICES:
        raise typer.BadParameter(f"{value!r} is not a calibration method; use one of {', '.join(CALIBRATION_CHOICES)}")
    return value


Calibration = Annotated[str, typer.Option(
    "--calibration", callback=_calibration, help="How int8 static calibrates activation ranges: minmax, entropy, "
    "percentile (99.999th), or auto (minmax, then percentile and entropy when the guard fails, before keeping nodes "
    "in float). --search-quantization / --search tries all three with every preset.")]
Candidates = Annotated[Optional[str], typer.Option("--candidates", help="Comma-separated candidate names (timm names "
                                                   "or derived:<teacher>:depth=F); default: the whole pool.")]


def student_choice(student: Optional[str], checkpoint: Optional[Path], pretrained: bool):
    """(--student name or the one --student-checkpoint implies, StudentInit). The checkpoint is read before any data
    is, so a wrong file fails first."""
    from edgekd.models import read_state_dict
    from edgekd.students import StudentInit, check_student_checkpoint, checkpoint_architecture

    if checkpoint is None:
        return student, StudentInit(pretrained=pretrained)
    state = read_state_dict(checkpoint)  # a missing or unreadable file is a one-line error now
    if student is None:
        student = checkpoint_architecture(checkpoint)
        if student is None:
            raise EdgekdError(f"cannot tell which architecture {checkpoint} holds (no metadata, config.json or "
                              "student.json beside it); pass --student NAME with it")
        log.info("--student-checkpoint %s holds %s: that is the student", checkpoint, student)
    check_student_checkpoint(student, state, checkpoint)
    return student, StudentInit(pretrained=pretrained, checkpoint=checkpoint)


def parse_input_size(value: Optional[int]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if value < 8 or value > 4096:
        raise EdgekdError(f"--input-size {value} is out of range; give a side length in pixels between 8 and 4096")
    return value, value


# ----------------------------------------------------------------------------------------------- commands

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
) -> None:
    """Load the teacher(s), fine-tune on the data when the head does not fit, report validation accuracy."""
    from edgekd.data import load_data
    from edgekd.teacher import prepare_teachers
    from edgekd.types import DataSpec, TrainConfig

    specs = teacher_specs(teacher, teacher_checkpoint, random_init)
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
                   f"on {loaded.info.num_val} images -> {result.weights_path}")


def teacher_specs(names: list[str], checkpoints: list[Path], random_init: bool):
    """Pair each --teacher with its --teacher-checkpoint (in order)."""
    from edgekd.models import resolve_model_name
    from edgekd.types import TeacherSpec

    for name in names:  # fail on a typo before any data is read
        resolve_model_name(name)
    if checkpoints and len(checkpoints) != len(names):
        raise EdgekdError(f"{len(names)} --teacher but {len(checkpoints)} --teacher-checkpoint; "
                          "give one checkpoint per teacher, in the same order")
    if checkpoints and random_init:
        raise EdgekdError("--random-init and --teacher-checkpoint contradict each other; pick one")
    return [TeacherSpec(name=name, checkpoint=checkpoints[i] if checkpoints else None, random_init=random_init)
            for i, name in enumerate(names)]


# ----------------------------------------------------------------------------------------------- devices + selection

PROFILE_HELP = ("Target device: a profile name (see `edgekd profiles`), a profile .toml, or the latency_table.json "
                "a probe pack wrote on the device.")


def _names(candidates: Optional[str]) -> Optional[list[str]]:
    return [name.strip() for name in candidates.split(",") if name.strip()] if candidates else None


@app.command("profiles")
@user_errors
def profiles_command() -> None:
    """List the device profiles edgekd knows (profiles/*.toml, and $EDGEKD_PROFILES)."""
    from edgekd.profiles import list_profiles

    for p in list_profiles():
        size = "teacher's" if p.input_size is None else f"{p.input_size}px"
        typer.echo(f"{p.name:14} {p.description}\n{'':14} providers {', '.join(p.providers)}; {p.threads} threads, "
                   f"batch {p.batch}, input {size}, precisions {', '.join(p.precisions)}, isa {p.isa}, "
                   f"latency: {'measured here' if p.latency == 'host' else 'probe pack on the device'} ({p.source})")


@app.command("select")
@user_errors
def select_command(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The teacher (timm name or alias)."),
    budget: str = typer.Option(..., "--budget", "-b", help="Latency budget per image, e.g. 10ms, 2.5 ms, 0.01s."),
    profile: str = typer.Option("host", "--profile", "-p", help=PROFILE_HELP),
    student: Optional[str] = typer.Option(None, "--student", help="Pin this student; still reports if it fits."),
    num_classes: int = typer.Option(1000, "--num-classes", help="The task's classes (the students' head size)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side in pixels (default: the profile's)."),
    candidates: Candidates = None,
    student_pretrained: StudentPretrained = True,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Latency cache (default ~/.cache/edgekd)."),
) -> None:
    """Measure every candidate student on the profile's device in its deployment form; choose one that fits."""
    from edgekd.candidates import measure_for_teacher, select_confirmed
    from edgekd.models import resolve_model_name
    from edgekd.profiles import load_profile
    from edgekd.select import RULE, format_table, parse_budget
    from edgekd.students import StudentInit

    budget_ms = parse_budget(budget)
    device = load_profile(profile)
    measured = measure_for_teacher(resolve_model_name(teacher), device, num_classes=num_classes,
                                   image_size=parse_input_size(input_size), student=student,
                                   names=_names(candidates), cache_dir=cache_dir,
                                   student_init=StudentInit(pretrained=student_pretrained))
    source = f"the device's table {device.table_path}" if device.table_path else f"this machine ({device.name})"
    typer.echo(f"latency measured on {source}: {', '.join(device.providers)}, {device.threads} threads, batch "
               f"{device.batch}; fastest of {', '.join(device.precisions)} per candidate; budget {budget_ms:g} ms p90")
    try:
        selection = select_confirmed(measured, budget_ms, device, num_classes=num_classes, student=student,
                                     cache_dir=cache_dir)
    except EdgekdError:
        typer.echo(format_table(measured, budget_ms, device.precisions))
        raise
    final = [verdict.candidate for verdict in selection.verdicts]  # with the choice's confirmed figure
    typer.echo(format_table(final, budget_ms, device.precisions, chosen=selection.chosen.model_name))
    typer.echo(f"rule: {RULE}")
    typer.echo(f"chosen: {selection.reason}")


@app.command("probe-pack")
@user_errors
def probe_pack_command(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The teacher (its derived student joins the pool)."),
    profile: str = typer.Option(..., "--profile", "-p", help=PROFILE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the pack (models, runner, pack.json)."),
    num_classes: int = typer.Option(1000, "--num-classes", help="The task's classes (the students' head size)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side in pixels (default: the profile's)."),
    candidates: Candidates = None,
) -> None:
    """Write the candidates' deployment-form ONNX files and a runner needing only onnxruntime + numpy."""
    from edgekd.models import resolve_model_name
    from edgekd.probe import TABLE_NAME, write_probe_pack
    from edgekd.profiles import load_profile

    runner = write_probe_pack(resolve_model_name(teacher), load_profile(profile), out, num_classes=num_classes,
                              image_size=parse_input_size(input_size), names=_names(candidates))
    typer.echo(f"probe pack written to {out}. On the device: pip install onnxruntime numpy; python {runner.name}; "
               f"then bring back {TABLE_NAME} and pass --profile {TABLE_NAME}")


# ----------------------------------------------------------------------------------------------- export + predict

@app.command("export")
@user_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="A student checkpoint folder (student.json + student.safetensors)."),
    out: Path = typer.Option(Path("export"), "--out", "-o", help="The bundle folder to write."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Needed for int8 (calibration)."),
    profile: str = typer.Option("host", "--profile", "-p", help="Target device profile: ISA, threads, precisions."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Top-1 points int8 may lose."),
    search: bool = typer.Option(False, "--search", help="Try every quantization preset of the ISA; keep the fastest."),
    calibration: Calibration = "auto",
    opset: int = typer.Option(17, "--opset", help="ONNX opset (17-20)."),
    ort_format: Optional[bool] = typer.Option(None, "--ort-format/--no-ort-format",
                                              help="Also write model.ort (default: the profile's ort_format)."),
    max_train: Optional[int] = typer.Option(512, "--max-train", help="Calibration images from the training split."),
    max_val: Optional[int] = typer.Option(1000, "--max-val", help="Validation images for the accuracy guard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
) -> None:
    """Export a trained student to a bundle: model.onnx (int8 where it pays), preprocess.json, manifest.json."""
    from edgekd.bundle import BundleOptions, bundle_from_checkpoint
    from edgekd.data import load_data
    from edgekd.profiles import load_profile
    from edgekd.quantize import CALIBRATION_IMAGES, GuardConfig
    from edgekd.students import read_student_checkpoint
    from edgekd.types import DataSpec

    student = read_student_checkpoint(checkpoint)
    device = load_profile(profile)
    loaded = load_data(DataSpec(source=data, max_train=max_train, max_val=max_val)) if data else None
    if loaded is None:
        log.info("no --data: the bundle ships fp32 (int8 needs calibration images and an accuracy check)")
    options = BundleOptions(
        isa=device.isa, precisions=tuple(p for p in device.precisions if p != "fp32"), search=search, opset=opset,
        guard=GuardConfig(max_accuracy_drop=max_accuracy_drop, calibration_method=calibration), threads=device.threads,
        overwrite=overwrite,
        time_models=device.latency == "host", calibration_images=max_train or CALIBRATION_IMAGES, validation_images=max_val,
        latency_table=device.table_path if device.latency == "table" else None,
        ort_format=device.ort_format if ort_format is None else ort_format)
    result = bundle_from_checkpoint(student, out, loaded, options)
    accuracy = "" if result.shipped.top1 is None else \
        f", top-1 {100 * result.shipped.top1:.2f}% (fp32 {100 * (result.fp32.top1 or 0):.2f}%)"
    typer.echo(f"bundle {result.path}: {result.precision}{accuracy}, parity max |logit diff| "
               f"{result.parity.max_abs_diff:.2g}" + (f"; {result.decision.reason}" if result.decision else ""))


@app.command("predict")
@user_errors
def predict_command(
    bundle: Path = typer.Argument(..., help="A bundle folder written by `edgekd export`."),
    images: list[Path] = typer.Argument(..., help="Image files."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Labels to print per image."),
) -> None:
    """Print the top-k labels with probabilities for each image (what edgekd.runtime.Predictor gives apps)."""
    from edgekd.runtime import BundleError, Predictor

    try:
        predictor = Predictor(bundle)
        for image in images:
            ranked = predictor.predict(image, top_k=top_k)
            typer.echo(f"{image}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in ranked))
    except BundleError as error:
        raise EdgekdError(str(error)) from error


@app.command("compress")
@user_errors
def compress_command(
    teacher: Teachers,
    budget: str = typer.Option(..., "--budget", "-b",
                               help="Latency budget per image on the profile: 10ms, 2.5 ms, 0.01s."),
    data: Data = "fashion-mnist",
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
    epochs: Annotated[float, typer.Option("--epochs", help="Distillation epochs (fractions allowed).")] = 3.0,
    loss: Losses = [],
    loss_option: LossOptions = [],
    temperature: Temperature = 4.0,
    batch_size: BatchSize = 128,
    lr: LearningRate = None,
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop",
                                            help="Top-1 points int8 may lose against the fp32 student."),
    search_quantization: bool = typer.Option(False, "--search-quantization",
                                             help="Try every quantization preset of the ISA, keep the fastest."),
    calibration: Calibration = "auto",
    max_train: MaxTrain = None,
    max_val: MaxVal = None,
    eval_images: int = typer.Option(2000, "--eval-images", help="Validation images for the int8 guard and bench."),
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
    from edgekd.distill.train import DistillConfig
    from edgekd.pipeline import CompressConfig, compress
    from edgekd.report import summary_lines
    from edgekd.select import parse_budget
    from edgekd.types import DataSpec, TrainConfig

    budget_ms = parse_budget(budget)
    specs = teacher_specs(teacher, teacher_checkpoint, random_init)
    student, student_init = student_choice(student, student_checkpoint, student_pretrained)
    image_size = parse_input_size(input_size)
    run_dir = out or Path("runs") / f"{specs[0].name.split('.')[0]}-{budget.replace(' ', '')}"
    config = CompressConfig(
        teachers=tuple(specs), budget_ms=budget_ms, out=run_dir, profile=profile, image_size=image_size,
        student=student, student_init=student_init, candidates=tuple(_names(candidates) or ()) or None,
        max_accuracy_drop=max_accuracy_drop, calibration_method=calibration,
        search_quantization=search_quantization, eval_images=eval_images,
        data=DataSpec(source=data, fashion_mnist_root=fashion_mnist_root, seed=seed, max_train=max_train,
                      max_val=max_val),
        teacher_training=TrainConfig(epochs=teacher_epochs, batch_size=batch_size, seed=seed, num_workers=workers,
                                     device=device, precision=precision, channels_last=channels_last),
        distillation=DistillConfig(losses=parse_loss_specs(loss, loss_option), temperature=temperature,
                                   epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, num_workers=workers,
                                   device=device,
                                   precision=precision, teacher_precision=teacher_precision,
                                   channels_last=channels_last))
    result = compress(config)
    for line in summary_lines(result.report):
        typer.echo(line)
    typer.echo(f"Report: {result.run_dir / 'report.html'} (also report.md, report.json)")
    typer.echo(f"Bundle: {result.bundle_dir} (edgekd predict {result.bundle_dir} IMAGE)")


@app.command("bench")
@user_errors
def bench_command(
    targets: list[Path] = typer.Argument(..., help="A run folder, bundle folders or .onnx files."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Images for accuracy (a run folder's by default)."),
    threads: list[int] = typer.Option([], "--threads", help="Thread counts (default: 1 and the profile's)."),
    profile: str = typer.Option("host", "--profile", "-p", help="Profile whose thread count is measured."),
    batch: int = typer.Option(32, "--batch", help="Batch size of the throughput measurement."),
    eval_images: int = typer.Option(2000, "--eval-images", help="Validation images for accuracy."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
) -> None:
    """Teacher vs student (or any models): latency p50/p90/p99, throughput, start-up, memory, size, accuracy."""
    import json

    from edgekd.artifacts import write_json_atomic
    from edgekd.bench import bench, models_from_paths
    from edgekd.data import load_data
    from edgekd.profiles import load_profile
    from edgekd.report import bench_tables
    from edgekd.types import DataSpec

    models = models_from_paths(targets)
    run_json = targets[0] / "run.json"
    if data is None and len(targets) == 1 and run_json.is_file():
        raw = json.loads(run_json.read_text())["config"]["data"]
        spec = DataSpec(source=raw["source"], fashion_mnist_root=raw.get("fashion_mnist_root"), seed=raw["seed"],
                        max_train=raw.get("max_train"), max_val=raw.get("max_val"))
    else:
        spec = DataSpec(source=data) if data else None
    loaded = load_data(spec) if spec else None
    counts = threads or sorted({1, load_profile(profile).threads})
    result = bench(models, data=loaded, threads=counts, throughput_batch=batch, max_eval_images=eval_images)
    for title, header, rows in bench_tables(result.to_dict()):
        typer.echo(f"\n{title}")
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        for row in [header, *rows]:
            typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    for note in result.notes:
        typer.echo(f"note: {note}")
    if out:
        write_json_atomic(out, result.to_dict())
        typer.echo(f"wrote {out}")


@app.command("distill")
@user_errors
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
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="Folder for the student, its log and state."),
    loss: Losses = [],
    loss_option: LossOptions = [],
    epochs: Annotated[float, typer.Option("--epochs", help="Distillation epochs (fractions allowed).")] = 10.0,
    batch_size: BatchSize = 128,
    lr: LearningRate = None,
    temperature: Temperature = 4.0,
    feature_pairs: Optional[str] = typer.Option(None, "--feature-pairs", help="STUDENT:TEACHER layer pairs, "
                                                "comma-separated (default: stage ends matched by relative depth)."),
    teacher_weighting: str = typer.Option("confidence", "--teacher-weighting", help="Several teachers: confidence "
                                          "(per sample) or mean."),
    no_augment: bool = typer.Option(False, "--no-augment", help="No random crop/flip."),
    cache_teacher: bool = typer.Option(False, "--cache-teacher", help="Reuse teacher outputs across epochs "
                                       "(needs --no-augment and no feature losses)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
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
    from edgekd.students import initial_student
    from edgekd.teacher import prepare_teachers, read_teacher_result
    from edgekd.types import DataSpec, TrainConfig

    if bool(teacher) == bool(teacher_dir):
        raise EdgekdError("give the teacher either by --teacher NAME or by --teacher-dir DIR (one of them)")
    student, student_init = student_choice(student, student_checkpoint, student_pretrained)
    if student is None:
        raise EdgekdError("give the student: --student NAME (a timm name, alias or derived:<teacher>:depth=F), or "
                          "--student-checkpoint PATH")
    if teacher and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EdgekdError("under torchrun, prepare the teacher once first (`edgekd train-teacher ... --out DIR`) "
                          "and pass --teacher-dir DIR")
    config = DistillConfig(losses=parse_loss_specs(loss, loss_option), temperature=temperature,
                           feature_pairs=parse_feature_pairs(feature_pairs), teacher_weighting=teacher_weighting,
                           epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           image_size=parse_input_size(input_size), augment=not no_augment,
                           cache_teacher=cache_teacher, compile=compile_model, resume=resume, num_workers=workers,
                           device=device, precision=precision, teacher_precision=teacher_precision,
                           channels_last=channels_last)
    specs = teacher_specs(teacher, teacher_checkpoint, random_init) if teacher else []
    loaded = load_data(DataSpec(source=data, seed=seed, max_train=max_train, max_val=max_val))
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
        agreement = "n/a" if result.teacher_agreement is None else f"{100 * result.teacher_agreement:.2f}%"
        typer.echo(f"student {student}: validation {accuracy}, agreement with {teachers[0].model_name} {agreement} "
                   f"-> {result.weights_path} (log: {out / 'distill_log.json'})")


if __name__ == "__main__":
    app()
