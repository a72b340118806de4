"""Teacher vs student on the runtimes apps use: latency, throughput, start-up, memory, size, accuracy, agreement.

Every latency comes from latency.measure_onnx, the routine candidate selection uses, so a budget checked at
selection time and a figure in the report mean the same thing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from edgekd.data import LoadedData
from edgekd.deploy.bundle import read_shipped_form
from edgekd.errors import EdgekdError, first_line
from edgekd.metrics import accuracy, paired_agreement, top_predictions
from edgekd.select.latency import measure_onnx
from edgekd.distill.train_utils import progress
from edgekd.types import Preprocess
from edgekd.deploy.verify import EvalSet, onnx_logits, precision_of_graph, preprocess_records

log = logging.getLogger(__name__)

# Providers an app can ship with; others ORT may list (Azure, TensorRT needing engines) are left out.
APP_PROVIDERS = ("CPUExecutionProvider", "XnnpackExecutionProvider", "CUDAExecutionProvider",
                 "CoreMLExecutionProvider", "NnapiExecutionProvider", "OpenVINOExecutionProvider")


@dataclass(frozen=True)
class BenchModel:
    """One ONNX file to measure; preprocessing and labels are needed only for accuracy."""

    name: str
    path: Path
    role: str = "model"  # "teacher", "student" or "model"
    precision: str = "fp32"
    preprocess: Preprocess | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimingRow:
    """One model on one provider at one thread count."""

    model: str
    provider: str
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    runs: int
    throughput_batch: int
    throughput_ips: float  # images per second at throughput_batch
    session_ms: float


@dataclass(frozen=True)
class ModelFacts:
    """What does not depend on the provider: file size, memory, accuracy."""

    name: str
    role: str
    precision: str
    path: str
    size_bytes: int
    peak_rss_mb: float  # whole process, after loading and running the model
    model_rss_mb: float  # what loading and running this model added to a bare onnxruntime process
    input_size: tuple[int, int, int] | None
    top1: float | None
    top5: float | None
    teacher_agreement: float | None  # top-1 agreement with the first teacher, on the same images
    eval_images: int


@dataclass(frozen=True)
class BenchResult:
    models: tuple[ModelFacts, ...]
    timings: tuple[TimingRow, ...]
    ort_version: str = ort.__version__
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"ort_version": self.ort_version, "notes": list(self.notes),
                "models": [asdict(m) for m in self.models], "timings": [asdict(t) for t in self.timings]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchResult:
        models = tuple(ModelFacts(**{**m, "input_size": tuple(m["input_size"]) if m["input_size"] else None})
                       for m in raw["models"])
        return cls(models=models, timings=tuple(TimingRow(**t) for t in raw["timings"]),
                   ort_version=raw["ort_version"], notes=tuple(raw["notes"]))

    def fastest(self, model: str, threads: int | None = None) -> TimingRow | None:
        rows = [t for t in self.timings if t.model == model and (threads is None or t.threads == threads)]
        return min(rows, key=lambda t: t.p50_ms, default=None)


def available_providers() -> list[str]:
    return [p for p in ort.get_available_providers() if p in APP_PROVIDERS]


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """A clear error for a file that is not a usable ONNX image classifier."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"no model at {path}; give an .onnx file, a bundle folder or a run folder")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as error:  # noqa: BLE001 - protobuf and checker raise many types; all mean "not valid ONNX"
        raise EdgekdError(f"{path} is not a valid ONNX model ({first_line(error, 120)}); "
                          "give a model exported by edgekd or torch.onnx") from error
    initializers = {init.name for init in model.graph.initializer}
    if len([i for i in model.graph.input if i.name not in initializers]) != 1:
        raise EdgekdError(f"{path} has several inputs; edgekd benchmarks single-input image models")
    return model


BENCH_MODELS_NAME = "bench_models.json"


def bench_model_to_dict(model: BenchModel, relative_to: Path) -> dict[str, Any]:
    return {"name": model.name, "path": str(Path(model.path).resolve().relative_to(Path(relative_to).resolve())),
            "role": model.role, "precision": model.precision, "labels": list(model.labels),
            "preprocess": model.preprocess.to_dict() if model.preprocess else None}


def models_from_paths(paths: Sequence[Path]) -> list[BenchModel]:
    """Run folders (their bench_models.json), bundle folders (model.onnx + preprocess.json) and .onnx files."""
    models: list[BenchModel] = []
    for path in map(Path, paths):
        if (path / BENCH_MODELS_NAME).is_file():
            for raw in json.loads((path / BENCH_MODELS_NAME).read_text()):
                pre = Preprocess.from_dict(raw["preprocess"]) if raw.get("preprocess") else None
                models.append(BenchModel(name=raw["name"], path=path / raw["path"], role=raw["role"],
                                         precision=raw["precision"], preprocess=pre, labels=tuple(raw["labels"])))
        elif (path / "preprocess.json").is_file():
            raw = json.loads((path / "preprocess.json").read_text())
            models.append(BenchModel(name=path.name, path=path / raw.get("model", "model.onnx"), role="model",
                                     precision=read_shipped_form(path).precision, preprocess=Preprocess.from_dict(raw),
                                     labels=tuple(raw.get("labels", ()))))
        elif path.is_dir():
            raise EdgekdError(f"{path} is neither a run folder ({BENCH_MODELS_NAME}) nor a bundle (preprocess.json)")
        elif path.suffix == ".ort":  # onnxruntime-mobile's form: no ONNX graph to read the input from
            raise EdgekdError(f"{path} is ONNX Runtime's mobile form of {path.with_suffix('.onnx').name}, the same "
                              "graph; bench that .onnx file or its bundle folder (the .ort runs on the phone)")
        else:
            models.append(BenchModel(name=path.stem, path=path, precision=precision_of_graph(path)))
    names = [m.name for m in models]
    if len(set(names)) != len(names):  # two bundles called "export": tell them apart by their parent folder
        models = [replace(m, name=f"{Path(m.path).parent.parent.name}/{m.name}") for m in models]
    return models


def bench(models: Sequence[BenchModel], *, data: LoadedData | None = None, threads: Sequence[int] = (1,),
          providers: Sequence[str] | None = None, throughput_batch: int = 32, max_eval_images: int | None = None,
          timing_seconds: float = 1.0) -> BenchResult:
    """Measure each model on each provider and thread count, plus size, memory and (with data) accuracy."""
    if not models:
        raise EdgekdError("nothing to benchmark; give a run folder, a bundle or .onnx files")
    for model in models:
        check_onnx_file(model.path)
    providers = list(providers or available_providers())
    notes = []
    timings = []
    steps = [(m, p, t) for m in models for p in providers for t in dict.fromkeys(threads)]
    for model, provider, thread_count in progress(steps, desc="bench", unit="config"):
        shape = model.preprocess.input_size if model.preprocess else None
        single = measure_onnx(model.path, shape, threads=thread_count, providers=(provider,), batch=1,
                              min_seconds=timing_seconds)
        batched = measure_onnx(model.path, shape, threads=thread_count, providers=(provider,),
                               batch=throughput_batch, min_runs=5, warmup=2, min_seconds=timing_seconds)
        timings.append(TimingRow(model=model.name, provider=provider, threads=thread_count, p50_ms=single.p50_ms,
                                 p90_ms=single.p90_ms, p99_ms=single.p99_ms, runs=single.runs,
                                 throughput_batch=throughput_batch,
                                 throughput_ips=throughput_batch * 1e3 / batched.p50_ms, session_ms=single.session_ms))
    facts, samples = _model_facts(models, data, max_eval_images)
    if samples:  # two benches of the same models on other samples differ: say which images these figures are on
        notes.append(f"accuracy on the validation images of {data.info.source}: "  # type: ignore[union-attr]
                     + "; ".join(sorted(set(samples))))
    if data is None:
        notes.append("no --data: accuracy and agreement were not measured")
    elif not data.info.labeled:
        notes.append("unlabeled data: accuracy is reported as top-1 agreement with the teacher")
    return BenchResult(models=tuple(facts), timings=tuple(timings), notes=tuple(notes))


def _model_facts(models: Sequence[BenchModel], data: LoadedData | None,
                 max_eval_images: int | None) -> tuple[list[ModelFacts], list[str]]:
    """Each model's size, memory and accuracy, and how its evaluation images were picked (EvalSet.method)."""
    evalsets: dict[Preprocess, EvalSet] = {}
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # image indices, top-1 classes
    facts = []
    teacher = next((m for m in models if m.role == "teacher"), None)
    ordered = sorted(models, key=lambda m: m is not teacher)  # the teacher's predictions are needed first
    for model in ordered:
        top1 = top5 = agreement = None
        count = 0
        if data is not None and model.preprocess is not None:
            if model.preprocess not in evalsets:
                evalsets[model.preprocess] = preprocess_records(data.val, model.preprocess, max_eval_images)
            evalset = evalsets[model.preprocess]
            logits = onnx_logits(model.path, evalset.images)
            top = top_predictions(logits)
            predictions[model.name] = (evalset.indices, top[:, 0])
            count = len(top)
            top1, top5 = accuracy(top, evalset.labels)
            if teacher is not None and teacher.name in predictions:
                agreement = paired_agreement(predictions[model.name], predictions[teacher.name])
        peak, delta = peak_rss_mb(model.path, model.preprocess.input_size if model.preprocess else None)
        facts.append(ModelFacts(name=model.name, role=model.role, precision=model.precision, path=str(model.path),
                                size_bytes=Path(model.path).stat().st_size, peak_rss_mb=peak, model_rss_mb=delta,
                                input_size=model.preprocess.input_size if model.preprocess else None, top1=top1,
                                top5=top5, teacher_agreement=agreement, eval_images=count))
    order = {m.name: i for i, m in enumerate(models)}
    return sorted(facts, key=lambda f: order[f.name]), [f"{len(evalset.labels)} images ({evalset.method})"
                                                            for evalset in evalsets.values()]


_RSS_PROBE = """
import json, resource, sys
import numpy as np, onnxruntime as ort

def high_water_kib():
    # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak across fork + exec on Linux.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = high_water_kib()
path, shape = sys.argv[1], json.loads(sys.argv[2])
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
meta = session.get_inputs()[0]
shape = [1, *shape] if shape else [d if isinstance(d, int) else 1 for d in meta.shape]
feed = {meta.name: np.zeros(shape, np.float32)}
for _ in range(3):
    session.run(None, feed)
peak = high_water_kib()
print(json.dumps([peak / 1024, (peak - base) / 1024]))
"""


def peak_rss_mb(path: Path, input_size: tuple[int, int, int] | None) -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh process that loads and runs the model, and what the model added.

    A separate process, because peak RSS only grows: measured in this one it would carry every earlier model.
    """
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), json.dumps(list(input_size or []))],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise EdgekdError(f"onnxruntime could not run {path}: {proc.stderr.strip().splitlines()[-1][:200]}")
    peak, delta = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(peak), float(delta)
