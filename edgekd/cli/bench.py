"""`edgekd bench`: teacher vs student, or any models, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from edgekd.cli.app import app, user_errors
from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    from edgekd.types import DataSpec


@app.command("bench")
@user_errors
def bench_command(
    targets: list[Path] = typer.Argument(..., help="A run folder, bundle folders or .onnx files."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Images for accuracy (a run folder's by default)."),
    threads: list[int] = typer.Option([], "--threads", help="Thread counts (default: 1 and the profile's)."),
    profile: str = typer.Option("host", "--profile", "-p", help="Profile whose thread count is measured."),
    batch: int = typer.Option(32, "--batch", min=1, help="Batch size of the throughput measurement."),
    eval_images: int = typer.Option(2000, "--eval-images", min=1, help="Validation images for accuracy."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
) -> None:
    """Teacher vs student (or any models): latency p50/p90/p99, throughput, start-up, memory, size, accuracy."""
    from edgekd.artifacts import write_json_atomic
    from edgekd.data import load_data
    from edgekd.evaluate.bench import bench, models_from_paths
    from edgekd.evaluate.report import bench_tables
    from edgekd.select.profiles import load_profile
    from edgekd.types import DataSpec

    if out is not None and (out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents)):
        raise EdgekdError(f"--out {out} cannot be written (a folder, or under a file); give a .json file path")
    if any(count < 1 for count in threads):
        raise EdgekdError(f"--threads {min(threads)}: each thread count must be at least 1")
    models = models_from_paths(targets)
    spec = DataSpec(source=data) if data else _runs_data(targets)
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


def _runs_data(targets: list[Path]) -> DataSpec | None:
    """The data the run folders were made on, when every target is a run folder and they agree (so two runs are
    compared on the same images); None otherwise, and the table says accuracy was not measured."""
    import json
    from dataclasses import replace

    from edgekd.pipeline import RUN_NAME
    from edgekd.types import DataSpec

    recorded = []
    for target in targets:
        run_json = Path(target) / RUN_NAME
        if not run_json.is_file():
            return None
        # Accuracy is measured on the validation split alone, so the --unlabeled-data folders are not indexed.
        recorded.append(replace(DataSpec.from_dict(json.loads(run_json.read_text())["config"]["data"]), unlabeled=()))
    if len(set(recorded)) > 1:
        raise EdgekdError("the runs were made on different data; pass --data DIR to compare them on the same images")
    return recorded[0] if recorded else None
