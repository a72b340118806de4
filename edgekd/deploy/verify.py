"""Checking ONNX models against the truth: ORT vs PyTorch parity, and accuracy/agreement on validation images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.data import Dataset

from edgekd.data import evaluation_read, pixels_transform
from edgekd.errors import EdgekdError
from edgekd.deploy.integer_emulation import INTEGER_PRODUCT_OPS, integer_products_in_float
from edgekd.metrics import accuracy
from edgekd.types import Preprocess

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_RTOL = 1e-3  # allowed |logit diff|, relative to the largest |logit| (at least 1)


class NormalizedPixels:
    """Preprocessed images kept as uint8 pixels (N x C x H x W, after the resize and crop) and normalised slice by
    slice: what the model sees, at a quarter of float32's memory (2,000 images at 224 px: 0.3 GB instead of 1.2 GB).
    Indexing gives float32 arrays, bit for bit the eval transform's tensors (x / 255 - mean) / std."""

    def __init__(self, pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
        self.pixels = pixels
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pixels.shape

    @property
    def ndim(self) -> int:
        return self.pixels.ndim

    def __getitem__(self, index) -> np.ndarray:
        return (self.pixels[index].astype(np.float32) / np.float32(255) - self.mean) / self.std


@dataclass(frozen=True)
class EvalSet:
    """Preprocessed images (float32 N x C x H x W when indexed, exactly what the model sees) and labels (-1 = none).
    `images` is a float32 array or NormalizedPixels; consumers take slices of it, never the whole at once."""

    images: np.ndarray | NormalizedPixels
    labels: np.ndarray
    method: str = "all"  # how the images were picked from their records (see sample_indices)
    indices: np.ndarray | None = None  # the records' indices of the rows (None: 0..N-1); undecodable ones left out

    def describe(self) -> dict[str, Any]:
        """What the manifest records of a calibration or evaluation set."""
        classes, counts = np.unique(self.labels, return_counts=True)
        return {"count": len(self), "method": self.method,
                "per_class": {str(int(c)): int(n) for c, n in zip(classes, counts)}}

    @property
    def labeled(self) -> bool:
        return bool((self.labels >= 0).any())

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Parity:
    """ORT vs PyTorch on the same real batch."""

    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "top1_agreement": self.top1_agreement, "count": self.count}


@dataclass(frozen=True)
class OnnxMetrics:
    """Accuracy of an ONNX model, and its top-1 agreement with a reference (the fp32 student)."""

    top1: float | None  # None without labels
    agreement: float | None  # None without a reference
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "agreement": self.agreement, "count": self.count}


def sample_indices(records: Dataset, limit: int | None, seed: int = 0) -> tuple[list[int], str]:
    """Which records calibrate or evaluate: all of them, or a stratified random `limit` (each class in its share),
    shuffled either way. Taking the first `limit` would calibrate a folder data set (sorted by class) on its first
    classes; in record order, the guard would rank quantization-sensitive nodes on the first images (one class) and
    averaged calibration would average one class per batch. Returns the indices and how they were picked."""
    if limit is None or limit >= len(records):
        return [int(i) for i in np.random.default_rng(seed).permutation(len(records))], f"all, shuffled, seed {seed}"
    from edgekd.data import stratified_subset

    labels = getattr(records, "labels", None)
    labels = np.asarray(labels) if labels is not None else np.zeros(len(records), dtype=np.int64)
    chosen = stratified_subset(labels, limit, seed)
    return [int(i) for i in np.random.default_rng(seed).permutation(chosen)], \
        f"stratified random {len(chosen)} of {len(records)}, seed {seed}"


def preprocess_records(records: Dataset, preprocess: Preprocess, limit: int | None = None, *,
                       seed: int = 0) -> EvalSet:
    """Run the deployment (eval) preprocessing over all records, or a stratified random `limit` of them; kept as
    uint8 pixels, normalised when read (NormalizedPixels)."""
    crop = pixels_transform(preprocess)
    indices, method = sample_indices(records, limit, seed)
    if not indices:
        raise EdgekdError("no images to evaluate on; check --data")
    pixels = np.empty((len(indices), *preprocess.input_size), dtype=np.uint8)  # filled in place: no second copy
    labels = np.empty(len(indices), dtype=np.int64)
    kept = []
    for index in indices:
        read = evaluation_read(records, index)
        if read is None:  # undecodable: left out, not replaced by another image
            continue
        image, labels[len(kept)] = read
        pixels[len(kept)] = crop(image)
        kept.append(index)
    if not kept:
        raise EdgekdError("none of the images to evaluate on can be decoded; check --data")
    if len(kept) < len(indices):
        method += f" ({len(indices) - len(kept)} undecodable left out)"
    rows = len(kept)
    return EvalSet(NormalizedPixels(pixels[:rows], preprocess.mean, preprocess.std), labels[:rows], method,
                   np.asarray(kept, dtype=np.int64))


def session(path: Path, threads: int = 0, *, unfused: bool = False) -> ort.InferenceSession:
    """A CPU session; `threads` 0 lets ORT pick. `unfused`: only ORT's basic graph optimisations, so a QDQ graph's
    ops compute in float on the dequantized values instead of in this CPU's fused int8 kernels (ORT fuses QDQ node
    units into int8 kernels from the extended level up), and the integer products of dynamic int8 and of QOperator
    static int8 are computed in float too (integer_emulation.py; see emulates_target). Basic, not none: its rewrites
    run on every ORT, whatever the CPU, and change answers (WeightBiasQuantization puts in int8 the float weights of a
    Conv fed by a dequantized tensor; float_weights.py), so a measurement without them is of a graph no app runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not unfused:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    graph = onnx.load(str(path), load_external_data=False).graph
    if not any(node.op_type in INTEGER_PRODUCT_OPS for node in graph.node):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rewritten = integer_products_in_float(onnx.load(str(path))).SerializeToString()
    return ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])


def emulates_target(path: Path, target_isa: str | None) -> bool:
    """Whether `path` must be measured in float to say what the CPU it is for computes: a QDQ or dynamic int8 file
    for another kind of CPU than this one. Int8 kernels differ by CPU: without VNNI, x86 multiplies uint8 by int8 in
    pairs summed into int16 (VPMADDUBSW), which saturates on full-range weights; the real Lite0's avx512_vnni int8
    agreed with fp32 on 79% of confident photo crops on such an AVX2 CPU and on 98.5% on a VNNI one. A QDQ graph
    run unfused computes what an int8 unit that does not saturate computes (VNNI, arm64's dot products, AVX2 with
    7-bit weights), up to the last rounding, and so does a dynamic or QOperator int8 file whose integer products are
    rewritten in float; a file for this CPU is measured in this CPU's own kernels, saturation included."""
    if target_isa is None or Path(path).suffix == ".ort":
        return False
    from edgekd.select.profiles import detect_isa  # the host's kind, as profiles with isa = "auto" see it

    if target_isa == detect_isa():
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}  # QDQ dequantizes its int8 weights; QOperator multiplies them
    return any((node.op_type == "DequantizeLinear" and node.input[0] in weights) or node.op_type in INTEGER_PRODUCT_OPS
               for node in graph.node)


# Ops whose answer for one image depends on the other images in its batch: DynamicQuantizeLinear computes one
# activation range per tensor, so batched evaluation of dynamic int8 measures a coarser model than the one that
# ships at batch 1 (MobileNetV3's int8_dynamic: 82% agreement with fp32 at batch 64, 100% at batch 1).
BATCH_DEPENDENT_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention"})


# Ops that only a quantized graph holds: dynamic int8 quantizes activations at run time (the ops whose answer
# depends on the batch, and MatMulInteger, which reads their output), static int8 carries fixed scales (QDQ pairs,
# or QLinear* QOperator ops that take them as inputs).
DYNAMIC_INT8_OPS = BATCH_DEPENDENT_OPS | {"MatMulInteger"}
STATIC_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "ConvInteger"})


def precision_of_graph(path: Path) -> str:
    """The precision an .onnx file holds, read from its graph, for files nothing records it for (a bare file, a
    bundle without a manifest): int8_dynamic, int8_static, fp16 (half-precision weights) or fp32. An unreadable file
    is called fp32: the caller's own checks say what is wrong with it."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - unreadable: the caller's file check says why, in one line
        return "fp32"
    ops = {node.op_type for node in graph.node}
    if ops & DYNAMIC_INT8_OPS:
        return "int8_dynamic"
    if ops & STATIC_INT8_OPS or any(op.startswith("QLinear") for op in ops):
        return "int8_static"
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return "fp16"
    return "fp32"


def batch_dependent(path: Path) -> bool:
    """Whether the model's answer for an image depends on the rest of its batch (see BATCH_DEPENDENT_OPS). A file
    that is not ONNX protobuf (an .ort flatbuffer) cannot be inspected: assume it does, batch 1 is always right."""
    if Path(path).suffix == ".ort":
        return True
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in BATCH_DEPENDENT_OPS for node in graph.node)


def onnx_logits(path: Path | ort.InferenceSession, images: np.ndarray, batch_size: int = 64, *,
                target_isa: str | None = None) -> np.ndarray:
    """Logits of an ONNX classifier over `images`, in batches; one image at a time for batch-dependent models
    (dynamic int8), so what is measured is what an app gets from one image. `target_isa`: the CPU kind the file is
    for, when that is not necessarily this one (see emulates_target)."""
    if not isinstance(path, ort.InferenceSession) and batch_dependent(path):
        batch_size = 1
    sess = path if isinstance(path, ort.InferenceSession) else session(
        path, unfused=emulates_target(path, target_isa))
    name = sess.get_inputs()[0].name
    chunks = [sess.run(None, {name: images[i:i + batch_size].astype(np.float32)})[0]
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float32)


def evaluate_onnx(path: Path, evalset: EvalSet, reference: np.ndarray | None = None, *,
                  target_isa: str | None = None) -> OnnxMetrics:
    """Top-1 accuracy on the labeled images and agreement with `reference` top-1 predictions (as `target_isa`'s
    CPU computes them: see emulates_target)."""
    predictions = onnx_logits(path, evalset.images, target_isa=target_isa).argmax(axis=1)
    return metrics_from_predictions(predictions, evalset, reference)


def metrics_from_predictions(predictions: np.ndarray, evalset: EvalSet,
                             reference: np.ndarray | None = None) -> OnnxMetrics:
    top1, _ = accuracy(predictions, evalset.labels)
    agreement = float((predictions == reference).mean()) if reference is not None else None
    return OnnxMetrics(top1=top1, agreement=agreement, count=len(predictions))


@dataclass(frozen=True)
class Reference:
    """The fp32 model's answers on an EvalSet, what every other form of it is measured against: its top-1 class and
    its softmax probabilities for each image."""

    predictions: np.ndarray  # N
    probabilities: np.ndarray  # N x classes, float32

    @classmethod
    def of(cls, logits: np.ndarray) -> "Reference":
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return cls(logits.argmax(axis=1), probabilities.astype(np.float32))

    def estimated_drop(self, predictions: np.ndarray) -> tuple[float, float]:
        """Points of top-1 accuracy that answering `predictions` instead of fp32's answers costs on images without
        labels, estimated from fp32's own probabilities, and its standard error. Each image where the two differ
        costs the probability fp32 gives its own class minus the one it gives the other's: what the change is
        expected to cost if those probabilities are how often each class is right. Near-ties cost almost nothing,
        as they do in top-1 (they flip both ways), where disagreement would count each as a whole wrong answer: on
        a 2-epoch MobileNetV3-large student, static int8 forms that lose 0.81-3.70 points of labeled top-1 change
        10.8-22.5% of its answers and are estimated to lose 1.16-3.50 (benchmarks/results/label_free_drop.md).
        The standard error is the sampling error alone: how far fp32's probabilities are from how often each class
        is right (up to 1.2 points there, on an underfit student) is not in it."""
        if len(predictions) != len(self.predictions):
            raise ValueError(f"{len(predictions)} answers for {len(self.predictions)} reference images")
        rows = np.arange(len(predictions))
        cost = self.probabilities[rows, self.predictions].astype(np.float64) - \
            self.probabilities[rows, predictions].astype(np.float64)
        if len(cost) == 0:
            return float("nan"), float("nan")
        return 100.0 * float(cost.mean()), 100.0 * float(cost.std() / np.sqrt(len(cost)))


@dataclass(frozen=True)
class AccuracyDrop:
    """Points of top-1 a form loses against fp32 on an EvalSet, with how precisely that is known."""

    points: float
    standard_error: float
    images: int  # how many images measured it (the labeled ones, when there are labels)
    estimated: bool  # no labels: estimated from fp32's probabilities (Reference.estimated_drop)


def accuracy_drop(reference: Reference, predictions: np.ndarray, labels: np.ndarray) -> AccuracyDrop:
    """The top-1 drop of `predictions` against fp32's: counted on the labeled images when there are any, estimated
    from fp32's probabilities when there are none."""
    labeled = labels >= 0
    if labeled.any():
        fp32_top1, _ = accuracy(reference.predictions, labels)
        top1, _ = accuracy(predictions, labels)
        points = 100.0 * (fp32_top1 - top1)
        spread = drop_standard_error(reference.predictions, predictions, labels)
        return AccuracyDrop(round(points, 6), round(spread, 6), int(labeled.sum()), False)  # 3/300 is 1.0 point
    points, spread = reference.estimated_drop(predictions)
    return AccuracyDrop(round(points, 6), round(spread, 6), len(predictions), True)


def drop_standard_error(reference: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The standard error, in points, of a top-1 drop measured on these images' labeled ones: how far the figure may
    sit from the drop on all such images. The two models answer the same images, so only those where exactly one is
    right carry the error (the paired, McNemar setting); on 1,000 images a model that changes 2% of its answers has a
    drop known to about +-0.45 points. NaN when none is labeled (Reference.estimated_drop has its own)."""
    labeled = labels >= 0  # top-1 counts the labeled images only (metrics.accuracy): so does its error
    reference, predictions, labels = reference[labeled], predictions[labeled], labels[labeled]
    n = len(predictions)
    if n == 0:
        return float("nan")
    lost = float(((reference == labels) & (predictions != labels)).sum())
    gained = float(((reference != labels) & (predictions == labels)).sum())
    return 100.0 * float(np.sqrt(max(0.0, lost + gained - (lost - gained) ** 2 / n))) / n


def check_parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray, rtol: float = PARITY_RTOL) -> Parity:
    """ORT must reproduce PyTorch's logits on `images`; a mismatch is an error, so no broken export ships."""
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images.astype(np.float32))).float().numpy()
    actual = onnx_logits(onnx_path, images)
    diff = float(np.abs(actual - expected).max())
    tolerance = rtol * max(1.0, float(np.abs(expected).max()))
    parity = Parity(max_abs_diff=diff, tolerance=tolerance, count=len(images),
                    top1_agreement=float((actual.argmax(1) == expected.argmax(1)).mean()))
    if not diff <= tolerance:
        raise EdgekdError(f"the ONNX export of {type(model).__name__} disagrees with PyTorch (max |logit diff| "
                          f"{diff:.3g} > {tolerance:.3g}, top-1 agreement {parity.top1_agreement:.1%}); "
                          "try another --opset or another student architecture")
    return parity
