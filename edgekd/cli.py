"""The `edgekd` command line: thin typer wrappers that parse options and call plain functions."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

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
                        stream=sys.stderr)


def user_errors(func: Callable) -> Callable:
    """User mistakes become one line on stderr and exit code 2; an interrupt says how to resume."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgekdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished stages are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


# ----------------------------------------------------------------------------------------------- shared options

def _teacher_help() -> str:
    from edgekd.models import alias_help

    return f"timm model name or alias ({alias_help()}). Repeat for several teachers."


DATA_HELP = ("Images: a folder with one sub-folder per class (train/ and val/ or test/ used when present), "
             "a folder of unlabeled images, or 'fashion-mnist'.")


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
    teacher: list[str] = typer.Option(..., "--teacher", "-t", help=_teacher_help()),
    data: str = typer.Option("fashion-mnist", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(Path("runs/teacher"), "--out", "-o", help="Folder for the teacher's weights and log."),
    teacher_checkpoint: list[Path] = typer.Option(
        [], "--teacher-checkpoint", help="A state_dict (.safetensors or .pth) per --teacher, loaded safely."),
    random_init: bool = typer.Option(False, "--random-init", help="Start from random weights (no pretrained)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side in pixels (default: the model's)."),
    epochs: float = typer.Option(2.0, "--epochs", help="Fine-tuning epochs (fractions allowed)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (AdamW, warm-up + cosine)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Use a stratified subset of training images."),
    max_val: Optional[int] = typer.Option(None, "--max-val", help="Use a stratified subset of validation images."),
    fashion_mnist_root: Optional[Path] = typer.Option(None, "--fashion-mnist-root", help="Where the idx files are."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes (default: cores - 1)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed"),
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
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, num_workers=workers, device=device)
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
CANDIDATES_HELP = "Comma-separated candidate names (timm names or derived:<teacher>:depth=F); default: the whole pool."


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
    candidates: Optional[str] = typer.Option(None, "--candidates", help=CANDIDATES_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Latency cache (default ~/.cache/edgekd)."),
) -> None:
    """Measure every candidate student on the profile's device in its deployment form; choose one that fits."""
    from edgekd.candidates import measure_for_teacher
    from edgekd.models import resolve_model_name
    from edgekd.profiles import load_profile
    from edgekd.select import RULE, format_table, parse_budget, select_student

    budget_ms = parse_budget(budget)
    device = load_profile(profile)
    measured = measure_for_teacher(resolve_model_name(teacher), device, num_classes=num_classes,
                                   image_size=parse_input_size(input_size), student=student,
                                   names=_names(candidates), cache_dir=cache_dir)
    source = f"the device's table {device.table_path}" if device.table_path else f"this machine ({device.name})"
    typer.echo(f"latency measured on {source}: {', '.join(device.providers)}, {device.threads} threads, batch "
               f"{device.batch}; fastest of {', '.join(device.precisions)} per candidate; budget {budget_ms:g} ms p90")
    try:
        selection = select_student(measured, budget_ms, student=student)
    except EdgekdError:
        typer.echo(format_table(measured, budget_ms, device.precisions))
        raise
    typer.echo(format_table(measured, budget_ms, device.precisions, chosen=selection.chosen.model_name))
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
    candidates: Optional[str] = typer.Option(None, "--candidates", help=CANDIDATES_HELP),
) -> None:
    """Write the candidates' deployment-form ONNX files and a runner needing only onnxruntime + numpy."""
    from edgekd.models import resolve_model_name
    from edgekd.probe import TABLE_NAME, write_probe_pack
    from edgekd.profiles import load_profile

    runner = write_probe_pack(resolve_model_name(teacher), load_profile(profile), out, num_classes=num_classes,
                              image_size=parse_input_size(input_size), names=_names(candidates))
    typer.echo(f"probe pack written to {out}. On the device: pip install onnxruntime numpy; python {runner.name}; "
               f"then bring back {TABLE_NAME} and pass --profile {TABLE_NAME}")


if __name__ == "__main__":
    app()
