"""Options several commands take, declared once (typer reads each option from its Annotated type), and the
parsing they share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from edgekd.errors import EdgekdError
from edgekd.recipe import (DEFAULT_MIX_ALPHA, FIXED_VIEWS_MAX_EPOCHS, FROM_RANDOM, FROM_REAL_WEIGHTS,
                           MIRROR_FIXED_VIEWS, MIX_MODES)

log = logging.getLogger("edgekd")


def _teacher_help() -> str:
    from edgekd.models import alias_help

    return f"timm model name or alias ({alias_help()}). Repeat for several teachers."


DATA_HELP = ("Images: a folder with one sub-folder per class (train/ and val/ or test/ used when present), "
             "a folder of unlabeled images, a .tar of either (read in place), or 'fashion-mnist'.")

def _one_of(what: str, choices: Callable[[], tuple[str, ...]]) -> Callable[[str | None], str | None]:
    """A parse-time check (a typo fails before any data is read); `choices` is called late, so heavy modules
    are imported only when the option is given."""

    def check(value: str | None) -> str | None:
        known = choices()
        if value is not None and value not in known:  # None: left to edgekd
            raise typer.BadParameter(f"{value!r} is not {what}; use one of {', '.join(known)}")
        return value

    return check


def _positive(what: str, example: str) -> Callable[[Optional[float]], Optional[float]]:
    """A parse-time check: otherwise a bad value fails only after the teacher is trained, with a traceback."""

    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and value <= 0:
            raise typer.BadParameter(f"{value:g} is not positive; {what} is above 0 (e.g. {example})")
        return value

    return check


def _percentage_as_share(value: Optional[float]) -> Optional[float]:
    """PERCENT at the command line, a share (0-1] in the code: the conversion is made once, here."""
    if value is None:
        return None
    if not 0 < value <= 100:
        raise typer.BadParameter(f"{value:g} is not a percentage of images; give one above 0 and at most 100 (e.g. 95)")
    return value / 100


def _precisions() -> tuple[str, ...]:
    from edgekd.distill.train_utils import PRECISIONS

    return tuple(PRECISIONS)


def _calibrations() -> tuple[str, ...]:
    from edgekd.deploy.quantize import CALIBRATION_CHOICES

    return tuple(CALIBRATION_CHOICES)


MaxAccuracyDrop = Annotated[float, typer.Option(
    "--max-accuracy-drop", metavar="POINTS",
    help="Top-1 points int8 (or fp16) may lose against the fp32 student. Counted on "
    "the labeled validation images; on unlabeled ones estimated from the fp32 student's own probabilities (a changed "
    "answer costs fp32's probability for its class minus the one for the new answer: near-ties cost little).")]
MinAgreement = Annotated[Optional[float], typer.Option(
    "--min-agreement", callback=_percentage_as_share, metavar="PERCENT",
    help="Also require int8 (and fp16) to give the fp32 student's top-1 answer on at least this share of the "
    "validation images, e.g. 95. Default: no floor, top-1 accuracy alone decides: a form can keep the accuracy and "
    "still change answers near ties (a 2-epoch MobileNetV3-large student's static int8 kept its top-1 and agreed on "
    "82.9%, benchmarks/results/quantization_fidelity_avx512_vnni.md).")]
Teachers = Annotated[list[str], typer.Option("--teacher", "-t", help=_teacher_help())]
TeacherCheckpoints = Annotated[list[Path], typer.Option(
    "--teacher-checkpoint", help="A state_dict (.safetensors or .pth) per --teacher, loaded safely.")]
RandomInit = Annotated[bool, typer.Option("--random-init", help="Teacher(s) from random weights, trained here.")]
TeacherEpochs = Annotated[float, typer.Option("--teacher-epochs", callback=_positive("a number of epochs", "2"),
                                              help="Epochs when the teacher needs fine-tuning.")]
Data = Annotated[str, typer.Option("--data", "-d", help=DATA_HELP)]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Side in pixels (default: the teacher's).")]
MaxTrain = Annotated[Optional[int], typer.Option("--max-train", min=1,
                                                 help="Use a stratified subset of training images.")]
MaxVal = Annotated[Optional[int], typer.Option("--max-val", min=1,
                                               help="Use a stratified subset of validation images.")]
FashionMnistRoot = Annotated[Optional[Path], typer.Option("--fashion-mnist-root", help="Where the idx files are.")]
UnlabeledData = Annotated[list[Path], typer.Option(
    "--unlabeled-data", help="A folder of images without labels (any layout; sub-folder names are ignored), "
    "repeatable: the student also learns these from the teacher alone. The teacher is fine-tuned on the labeled "
    "--data only. Each epoch shows every labeled and unlabeled image once, shuffled together (see --labeled-repeat).")]
LabeledRepeat = Annotated[int, typer.Option(
    "--labeled-repeat", min=1, help="With --unlabeled-data: show each labeled image this many times per epoch, raising "
    "the labeled share of every batch (default 1: the data's own proportion).")]


Mix = Annotated[Optional[str], typer.Option(
    "--mix", callback=_one_of("a mixing mode", lambda: MIX_MODES),
    help="Consistent teaching: mix pairs of images in each batch (mixup, cutmix, or mixup+cutmix: either, by "
    "coin flip, per batch) after the shared view is made, and give the teacher the very image the student sees;"
    " kd learns the teacher's answer on it, ce the mixed labels. none: no mixing. Default (edgekd/recipe.py): "
    f"for a student from random weights {FROM_RANDOM.mix}, added to the batch (see --mix-extra); from real weights "
    f"{FROM_REAL_WEIGHTS.mix}.")]
MixExtra = Annotated[Optional[float], typer.Option(
    "--mix-extra", min=0.0, help="With --mix: keep each batch's images as they are and add this many mixed images "
    "per image (0.5: 64 beside a batch of 128; the teacher answers those live, the others from its cache); 0: "
    "every image is mixed instead, as in function matching. Default (edgekd/recipe.py): "
    f"{FROM_RANDOM.mix_extra:g} from random weights, else 0: with 10,000 labels over 8 epochs the default then beat "
    "labels only by 1.3 points (every seed) and plain KD by 0.5 (6 seed-runs of 8), at 1.5x the time "
    "(benchmarks/results/distill_fashion_mnist.md); with 1,000 labels and 59,000 unlabeled images it gained 0.4 "
    "(every seed; distill_few_labels.md); mixing every image cost 4-5 points.")]
MixAlpha = Annotated[float, typer.Option(
    "--mix-alpha", min=0.01, help="The mixing ratio is drawn from Beta(alpha, alpha): 1.0 uniform, "
    f"smaller values mostly keep one image (default {DEFAULT_MIX_ALPHA:g}).")]
Epochs = Annotated[float, typer.Option("--epochs", callback=_positive("a number of epochs", "8"),
                                       help="Training epochs (fractions allowed).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=2, help="Global batch, split across torchrun processes.")]
LearningRate = Annotated[Optional[float], typer.Option(
    "--lr", callback=_positive("a learning rate", "0.004"),
    help="Peak learning rate of the head (AdamW, warm-up + cosine; in compress: of distillation). Default: from real "
    "weights 4e-3 for CNNs and 5e-4 x batch/256 for transformers, with the backbone's layers at rates decaying with "
    "depth (timm's layer-wise decay); from random weights one rate for every layer: "
    f"{FROM_RANDOM.lr:g} when distilling (edgekd/recipe.py), 0.002 for a teacher.")]
Losses = Annotated[list[str], typer.Option(
    "--loss", help="name=weight or name=start:end (ramped over training), repeatable; known: ce, kd, dkd, wsl, "
    "dist, fitnet, at, proj, rkd, sp. Default (edgekd/recipe.py): for a student from random weights "
    + " ".join(FROM_RANDOM.losses)
    + " with " + " ".join(FROM_RANDOM.loss_options) + f" and --temperature {FROM_RANDOM.temperature:g}, "
    f"logit-standardized KD, trained at --lr {FROM_RANDOM.lr:g}, with mixed images added (--mix-extra): with 1,000 "
    "labels and 59,000 unlabeled images it ended 0.5 points below its teacher and 6.2 above labels only "
    "(benchmarks/results/distill_few_labels.md; without the mixed images, 3.7 above plain KD); with 10,000 labels, "
    "1.3 above labels only and 0.5 above plain KD (distill_fashion_mnist.md, 8 seed-runs). For a student from real "
    "weights "
    "(pretrained, teacher-derived, a checkpoint) " + " ".join(FROM_REAL_WEIGHTS.losses)
    + f" at --temperature {FROM_REAL_WEIGHTS.temperature:g}: "
    "the standardized recipe held the demo's student near its teacher (86.95% against 88.35-88.80%). No ce without "
    "labels.")]
LossOptions = Annotated[list[str], typer.Option(
    "--loss-option", help="A loss's constant as LOSS.KEY=VALUE, repeatable: kd.standardize=1 (z-scored logits), "
    "kd.correct=1 (where the teacher's top class is not the label, that logit and the label's swap), dkd.alpha, "
    "dkd.beta (default 1, 8), rkd.distance, rkd.angle (default 1, 2).")]
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", callback=_positive("a softmax temperature", "2 or 4"),
    help="Softmax temperature of kd and dkd (default: the recipe's, see --loss).")]
Augment = Annotated[Optional[bool], typer.Option(
    "--augment/--no-augment", help="A random crop and flip of each image per epoch, the same view for the teacher "
    f"and the student. Default (edgekd/recipe.py): off up to {FIXED_VIEWS_MAX_EPOCHS:g} epochs (fixed views scored "
    "1.8-6 points higher in edgekd's benchmarks, from random and from real weights, and the teacher then answers "
    "each image once, see --cache-teacher), on beyond.")]
Flip = Annotated[Optional[bool], typer.Option(
    "--flip/--no-flip", help="On fixed views: each image or its mirror image, drawn per image and epoch, the same for "
    "the teacher and the student; the teacher cache keeps both views. Default (edgekd/recipe.py): "
    f"{'on' if MIRROR_FIXED_VIEWS else 'off'}: it cost every recipe 0.3-1 point at 8 epochs "
    "(benchmarks/results/distill_fashion_mnist.md). The crop/flip of --augment flips already.")]
CacheTeacher = Annotated[Optional[bool], typer.Option(
    "--cache-teacher/--no-cache-teacher", help="Keep teacher outputs on disk, keyed by content, for later epochs and "
    "runs. Default: wherever views are fixed (no --augment, no --mix) and no feature loss needs the teacher's maps.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader processes (default: cores - 1).")]


def _device(value: str) -> str:
    """A parse-time check: --device cuda on a machine without a GPU fails before any data is read."""
    from edgekd.distill.train_utils import pick_device

    try:
        pick_device(value)
    except RuntimeError as error:  # torch's own "Invalid device string" and the like
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N") from error
    except EdgekdError as error:
        raise typer.BadParameter(str(error)) from None
    return value


Device = Annotated[str, typer.Option("--device", callback=_device,
                                     help="auto, cpu, cuda or cuda:N (under torchrun: each rank's GPU).")]
Precision = Annotated[str, typer.Option(
    "--precision", callback=_one_of("a precision", _precisions),
    help="Training precision: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.")]
TeacherPrecision = Annotated[str, typer.Option(
    "--teacher-precision", callback=_one_of("a precision", _precisions),
    help="The teacher's forward pass: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), bf16 or fp32.")]
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
Calibration = Annotated[str, typer.Option(
    "--calibration", callback=_one_of("a calibration method", _calibrations),
    help="How int8 static calibrates activation ranges: minmax, average (the mean of per-batch extremes: a few "
    "images with extreme activations do not stretch them), entropy, percentile (99.999th), or auto (minmax, then "
    "average, percentile and entropy when the guard fails, before keeping nodes in float). --search-quantization "
    "tries each with every preset.")]


def _candidate_names(value: Optional[str]) -> Optional[str]:
    """A parse-time check: a typo among the candidates fails now, not as a row of the report; an empty list is not
    taken to mean the whole pool (minutes of timing)."""
    if value is not None and not _names(value):
        raise typer.BadParameter("names no candidate; leave the option out to measure the whole pool")
    try:
        check_model_names("--candidates", _names(value) or [])
    except EdgekdError as error:
        raise typer.BadParameter(str(error).removeprefix("--candidates: ")) from None
    if value is None:
        return None
    from edgekd.distill.students import parse_derived

    # one spelling per model: a derived student named through an alias (derived:efficientnet_lite0:...) is the
    # teacher-derived candidate a latency table or a selection looks for (derived:tf_efficientnet_lite0:...)
    return ",".join(spec.name if (spec := parse_derived(name)) else name for name in _names(value) or [])


Candidates = Annotated[Optional[str], typer.Option("--candidates", callback=_candidate_names,
                                                   help="Comma-separated candidate names (timm names or "
                                                   "derived:<teacher>:depth=F); default: the whole pool.")]


def student_choice(student: Optional[str], checkpoint: Optional[Path], pretrained: bool):
    """(--student name or the one --student-checkpoint implies, StudentInit). The checkpoint is read before any data
    is, so a wrong file fails first."""
    from edgekd.distill.students import StudentInit, check_student_checkpoint, checkpoint_architecture
    from edgekd.models import read_state_dict

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


def check_model_names(option: str, names: list[str]) -> None:
    """Fail on a typo in --student / --candidates before the teacher is trained (a derived name is checked by its own
    parser), with the closest names."""
    from edgekd.distill.students import parse_derived
    from edgekd.models import resolve_model_name

    for name in names:
        try:
            if parse_derived(name) is None:
                resolve_model_name(name)
        except EdgekdError as error:
            raise EdgekdError(f"{option}: {error}") from None


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a finished result of another model in --out.")]


def check_not_replacing(result_file: Path, model_name: str, what: str, overwrite: bool) -> None:
    """Refuse to replace, without --overwrite, a finished `what` of another model in --out (`result_file`, its JSON
    record with a model_name): the stages run alone write into a folder the user names, where compress's run folder
    knows what it holds. The same model is made again, as a re-run of the same command would be."""
    import json

    if overwrite or not result_file.is_file():
        return
    try:
        held = json.loads(result_file.read_text()).get("model_name")
    except (ValueError, AttributeError):
        held = None
    if held is not None and held != model_name:
        raise EdgekdError(f"{result_file.parent} holds a finished {what} ({held}); pass --overwrite to replace it "
                          f"with {model_name}, or another --out")


def parse_input_size(value: Optional[int]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if value < 8 or value > 4096:
        raise EdgekdError(f"--input-size {value} is out of range; give a side length in pixels between 8 and 4096")
    return value, value


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

BUDGET_HELP = ("Latency budget per image on the profile (its p90): 10ms, 2.5 ms, 0.01s; or a speed-up over the "
               "teacher, 4x: its fp32 p90 on the same profile / 4 (the same ask on a fast machine and a slow one).")
PROFILE_HELP = ("Target device: a profile name (see `edgekd profiles`), a profile .toml, or the latency_table.json "
                "a probe pack wrote on the device.")


def _names(candidates: Optional[str]) -> Optional[list[str]]:
    return [name.strip() for name in candidates.split(",") if name.strip()] if candidates else None
