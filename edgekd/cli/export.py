"""`edgekd export` and `edgekd predict`: a bundle from a trained student, and using it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgekd.cli.app import app, log, user_errors
from edgekd.cli.options import DATA_HELP, Calibration, MaxAccuracyDrop, MinAgreement
from edgekd.deploy import MAX_ACCURACY_DROP
from edgekd.errors import EdgekdError


@app.command("export")
@user_errors(resume="nothing was written (a bundle appears whole or not at all); run the same command again")
def export_command(
    checkpoint: Path = typer.Argument(..., help="A student checkpoint folder (student.json + student.safetensors)."),
    out: Path = typer.Option(Path("export"), "--out", "-o", help="The bundle folder to write."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Needed for int8 (calibration)."),
    profile: str = typer.Option("host", "--profile", "-p", help="Target device profile: ISA, threads, precisions."),
    max_accuracy_drop: MaxAccuracyDrop = MAX_ACCURACY_DROP,
    min_agreement: MinAgreement = None,
    search: bool = typer.Option(False, "--search-quantization", "--search",
                                help="Try every quantization preset of the ISA; keep the fastest."),
    calibration: Calibration = "auto",
    opset: int = typer.Option(17, "--opset", help="ONNX opset (17-20)."),
    ort_format: Optional[bool] = typer.Option(None, "--ort-format/--no-ort-format",
                                              help="Also write model.ort (default: the profile's ort_format)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Calibration images from the training split "
                                            "(default: edgekd's calibration size, 256)."),
    max_val: Optional[int] = typer.Option(1000, "--max-val", help="Validation images for the accuracy guard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
) -> None:
    """Export a trained student to a bundle: model.onnx (int8 where it pays), preprocess.json, manifest.json."""
    from edgekd.data import load_data
    from edgekd.deploy.bundle import BundleOptions, bundle_from_checkpoint
    from edgekd.deploy.quantize import CALIBRATION_IMAGES
    from edgekd.deploy.guard import GuardConfig
    from edgekd.distill.students import read_student_checkpoint
    from edgekd.select.profiles import load_profile
    from edgekd.types import DataSpec

    student = read_student_checkpoint(checkpoint)
    device = load_profile(profile)
    loaded = load_data(DataSpec(source=data, max_train=max_train, max_val=max_val)) if data else None
    if loaded is None:
        log.info("no --data: the bundle ships fp32 (int8 needs calibration images and an accuracy check)")
    options = BundleOptions(
        isa=device.isa, precisions=tuple(p for p in device.precisions if p != "fp32"), search=search, opset=opset,
        guard=GuardConfig(max_accuracy_drop=max_accuracy_drop, calibration_method=calibration,
                          min_agreement=min_agreement),
        threads=device.threads,
        overwrite=overwrite, time_models=device.latency == "host",
        calibration_images=max_train or CALIBRATION_IMAGES, validation_images=max_val,
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
    bundle: Path = typer.Argument(..., help="A bundle folder written by `edgekd export` (or a compress run folder: "
                                  "its export/)."),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them (read with their sub-folders)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels to print per image."),
) -> None:
    """Print the top-k labels with probabilities for each image (what edgekd.runtime.Predictor gives apps)."""
    from edgekd.data import IMAGE_EXTENSIONS, images_in
    from edgekd.runtime import PREPROCESS_NAME, BundleError, Predictor

    if not (bundle / PREPROCESS_NAME).is_file() and (bundle / "export" / PREPROCESS_NAME).is_file():
        bundle = bundle / "export"  # a compress run folder: its bundle
    if not (bundle / PREPROCESS_NAME).is_file() and (bundle / "student.json").is_file():
        raise EdgekdError(f"{bundle} holds a trained student, not a bundle; make one with `edgekd export {bundle} "
                          "--data ...` and predict with that")
    try:
        predictor = Predictor(bundle)
    except BundleError as error:
        raise EdgekdError(str(error)) from error
    files, unreadable = [], []
    for path in images:
        found = images_in(path, recursive=True) if path.is_dir() else [path]
        if not found:
            unreadable.append(path)
            typer.echo(f"error: {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})", err=True)
        files += found
    for image in files:  # an image that cannot be read is said, and the others still answered
        try:
            ranked = predictor.predict(image, top_k=top_k)
        except BundleError as error:
            unreadable.append(image)
            typer.echo(f"error: {error}", err=True)
            continue
        typer.echo(f"{image}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in ranked))
    if unreadable:
        raise typer.Exit(2)
