"""`edgekd profiles`, `edgekd select`, `edgekd probe-pack`: devices and student selection."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgekd.cli.app import app, user_errors
from edgekd.cli.options import (BUDGET_HELP, PROFILE_HELP, Candidates, StudentPretrained, _names, check_model_names,
                                parse_input_size)
from edgekd.errors import EdgekdError


@app.command("profiles")
@user_errors
def profiles_command() -> None:
    """List the device profiles edgekd knows (profiles/*.toml, and $EDGEKD_PROFILES)."""
    from edgekd.select.profiles import list_profiles

    listed = list_profiles()
    stems = {name for name, _ in listed}
    for name, p in listed:
        if isinstance(p, EdgekdError):
            typer.echo(f"{name:14} cannot be used: {p}")
            continue
        # the name inside the file answers to --profile too, unless a file of that name takes it
        also = f" (also --profile {p.name}, the name in its file)" if p.name not in stems else ""
        size = "teacher's" if p.input_size is None else f"{p.input_size}px"
        typer.echo(f"{name:14} {p.description}{also}\n{'':14} providers {', '.join(p.providers)}; "
                   f"{p.threads} threads, "
                   f"batch {p.batch}, input {size}, precisions {', '.join(p.precisions)}, isa {p.isa}, "
                   f"latency: {'measured here' if p.latency == 'host' else 'probe pack on the device'} ({p.source})")
    if any(isinstance(p, EdgekdError) for _, p in listed):
        raise typer.Exit(2)  # the others are listed; a script still learns that a profile file needs fixing


@app.command("select")
@user_errors
def select_command(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The teacher (timm name or alias)."),
    budget: str = typer.Option(..., "--budget", "-b", help=BUDGET_HELP),
    profile: str = typer.Option("host", "--profile", "-p", help=PROFILE_HELP),
    student: Optional[str] = typer.Option(None, "--student", help="Pin this student; still reports if it fits."),
    num_classes: int = typer.Option(1000, "--num-classes", min=1,
                                    help="The task's classes (the students' head size)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side in pixels (default: the profile's)."),
    candidates: Candidates = None,
    student_pretrained: StudentPretrained = True,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Latency cache (default "
                                             "~/.cache/edgekd/latency, or EDGEKD_CACHE_DIR)."),
) -> None:
    """Measure every candidate student on the profile's device in its deployment form; choose one that fits."""
    from edgekd.distill.students import StudentInit
    from edgekd.models import resolve_model_name
    from edgekd.select.candidates import measure_for_teacher, resolve_budget, select_confirmed
    from edgekd.select.profiles import load_profile
    from edgekd.select.rule import RULE, format_table, parse_budget

    check_model_names("--student", [student] if student else [])
    wanted = parse_budget(budget)
    device = load_profile(profile)
    teacher_name, size = resolve_model_name(teacher), parse_input_size(input_size)
    resolved = resolve_budget(wanted, teacher_name, device, num_classes=num_classes, image_size=size,
                              cache_dir=cache_dir)
    budget_ms = resolved.ms
    measured = measure_for_teacher(teacher_name, device, num_classes=num_classes, image_size=size, student=student,
                                   names=_names(candidates), cache_dir=cache_dir,
                                   student_init=StudentInit(pretrained=student_pretrained))
    source = f"the device's table {device.table_path}" if device.table_path else f"this machine ({device.name})"
    typer.echo(f"latency measured on {source}: {', '.join(device.providers)}, {device.threads} threads, batch "
               f"{device.batch}; fastest of {', '.join(device.precisions)} per candidate; budget {budget_ms:.3g} ms p90"
               + (f" ({resolved.source})" if resolved.source else ""))
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
    num_classes: int = typer.Option(1000, "--num-classes", min=1,
                                    help="The task's classes (the students' head size)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side in pixels (default: the profile's)."),
    candidates: Candidates = None,
) -> None:
    """Write the candidates' deployment-form ONNX files and a runner needing only onnxruntime + numpy."""
    from edgekd.models import resolve_model_name
    from edgekd.select.probe import TABLE_NAME, write_probe_pack
    from edgekd.select.profiles import load_profile

    runner = write_probe_pack(resolve_model_name(teacher), load_profile(profile), out, num_classes=num_classes,
                              image_size=parse_input_size(input_size), names=_names(candidates))
    typer.echo(f"probe pack written to {out}. On the device: pip install onnxruntime numpy; python {runner.name}; "
               f"then bring back {TABLE_NAME} and pass --profile {TABLE_NAME}")
