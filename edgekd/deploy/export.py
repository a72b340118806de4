"""torch -> ONNX: one portable graph with a dynamic batch axis, checked, graph-optimised, and parity-gated.

We use the TorchScript exporter (`dynamo=False`): on timm models it exports in 0.1-0.7 s and honours the
requested opset, while the dynamo exporter takes 1.5-2.5 s per model, writes opset 18 whatever is asked
(its down-conversion to 17 fails on Resize/Reduce axes) and prints a traceback while doing so.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgekd.artifacts import atomic_path
from edgekd.errors import EdgekdError, first_line
from edgekd.deploy.verify import INPUT_NAME, OUTPUT_NAME, PARITY_RTOL, Parity, check_parity

log = logging.getLogger(__name__)

MIN_OPSET = 17
MAX_OPSET = 20  # the newest opset the TorchScript exporter writes


def export_onnx(model: torch.nn.Module, path: Path, input_size: tuple[int, int, int], *, opset: int = 17,
                check_inputs: np.ndarray | None = None, optimize: bool = True) -> Path:
    """Export `model` to `path` (input "input", output "logits", dynamic batch axis), whole or not at all.

    The file is written only after `onnx.checker` passes, ONNX Runtime's portable (basic-level) graph
    optimisation ran, and ORT reproduces torch's logits on `check_inputs` (random inputs when None): an export
    that breaks parity is an error, not a file.
    """
    return export_with_parity(model, path, input_size, opset=opset, check_inputs=check_inputs, optimize=optimize)[0]


def export_with_parity(model: torch.nn.Module, path: Path, input_size: tuple[int, int, int], *, opset: int = 17,
                       check_inputs: np.ndarray | None = None, optimize: bool = True,
                       rtol: float = PARITY_RTOL) -> tuple[Path, Parity]:
    """export_onnx, also returning the parity figures (for the manifest)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise EdgekdError(f"opset {opset} is not supported; use an opset between {MIN_OPSET} and {MAX_OPSET}")
    path = Path(path)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # export on CPU without moving the caller's (training) model
    was_training = model.training
    try:
        return _export_checked(model.eval(), path, input_size, opset, check_inputs, optimize, rtol)
    finally:
        model.train(was_training)


def _export_checked(model: torch.nn.Module, path: Path, input_size: tuple[int, int, int], opset: int,
                    check_inputs: np.ndarray | None, optimize: bool, rtol: float) -> tuple[Path, Parity]:
    sample = torch.zeros(2, *input_size)
    with atomic_path(path) as tmp:
        _torch_export(with_static_same_padding(model, input_size), sample, tmp, opset)  # parity: against `model`
        check_model(tmp)
        if optimize:
            optimize_graph(tmp)
        inputs = check_inputs if check_inputs is not None else \
            np.random.default_rng(0).standard_normal((2, *input_size)).astype(np.float32)
        parity = check_parity(model, tmp, inputs, rtol)
    log.debug("exported %s to %s (opset %d, max |logit diff| %.2g)", type(model).__name__, path, opset,
              parity.max_abs_diff)
    return path, parity


def with_static_same_padding(model: torch.nn.Module, input_size: tuple[int, int, int]) -> torch.nn.Module:
    """`model`, or a copy whose TF-"SAME" layers (timm's Conv2dSame, MaxPool2dSame, AvgPool2dSame, in every tf_*
    model) pad by constants computed for `input_size` (timm's Conv2dSameExport does the same, behind a flag).

    timm computes those pads from each input's shape at run time, so the ONNX graph carries Shape -> Cast -> Div ->
    Ceil -> Pad arithmetic per layer. fp16 conversion drops its float -> int64 -> float casts (the floor in
    pad // 2): pads of 0.5 truncated to 0, and a real ImageNet EfficientNet-Lite0 in fp16 agreed with fp32 on 52% of
    real photos. An export has one spatial size (only the batch axis is dynamic), where the pads are constants.
    """
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    names = [name for name, module in model.named_modules() if isinstance(module, (Conv2dSame, MaxPool2dSame,
                                                                                      AvgPool2dSame))]
    if not names:
        return model
    sizes: dict[str, list[int]] = {}

    def record(name: str, module: torch.nn.Module, args: tuple) -> None:
        sizes.setdefault(name, [int(d) for d in args[0].shape[-2:]])

    hooks = [model.get_submodule(name).register_forward_pre_hook(functools.partial(record, name)) for name in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    static = copy.deepcopy(model)
    for name in names:
        layer = static.get_submodule(name)
        kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
        dilation = _pair(getattr(layer, "dilation", 1))
        pads = pad_same_arg(sizes[name], kernel, stride, dilation)
        parent, _, child = name.rpartition(".")
        setattr(static.get_submodule(parent) if parent else static, child, _StaticSamePad(layer, pads))
    return static


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class _StaticSamePad(torch.nn.Module):
    """A timm "SAME" layer with its pads fixed: constant Pad, then the layer's own op without padding."""

    def __init__(self, layer: torch.nn.Module, pads: list[int]):
        super().__init__()
        from timm.layers import Conv2dSame
        from timm.layers.pool2d_same import MaxPool2dSame

        self.layer, self.pads = layer, [int(p) for p in pads]
        self.value = -float("inf") if isinstance(layer, MaxPool2dSame) else 0.0
        self.kind = "conv" if isinstance(layer, Conv2dSame) else "max" if self.value else "avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = F.pad(x, self.pads, value=self.value)
        layer = self.layer
        if self.kind == "conv":
            return F.conv2d(x, layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)
        if self.kind == "max":
            return F.max_pool2d(x, layer.kernel_size, layer.stride, 0, layer.dilation, layer.ceil_mode)
        return F.avg_pool2d(x, layer.kernel_size, layer.stride, 0, layer.ceil_mode, layer.count_include_pad)


def _torch_export(model: torch.nn.Module, sample: torch.Tensor, target: Path, opset: int) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(model, (sample,), str(target), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export this"
        message = first_line(error, limit=1000)
        culprit = _module_calling(model, sample, message)
        where = f" in module {culprit}" if culprit else ""
        raise EdgekdError(f"cannot export {type(model).__name__} to ONNX opset {opset}{where}: {message}; "
                          f"try a newer --opset (up to {MAX_OPSET}) or another student architecture") from error


def _module_calling(model: torch.nn.Module, sample: torch.Tensor, message: str) -> str | None:
    """Name the module (dotted path and class) holding the aten operator an exporter error names.

    Tracing again gives every graph node its module scope, e.g. '__module.stages/__module.stages.1'.
    """
    operator = re.search(r"'(aten::\w+)'", message)
    if not operator:
        return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, (sample,), check_trace=False).inlined_graph
    except Exception:  # noqa: BLE001 - best effort: the export error itself is what we report
        return None
    for node in graph.nodes():
        if node.kind() == operator.group(1):
            path = node.scopeName().split("/")[-1].removeprefix("__module").removeprefix(".")
            return f"{path or '<model>'} ({type(model.get_submodule(path)).__name__})"
    return None


def check_model(path: Path) -> onnx.ModelProto:
    """`onnx.checker` on a file; a corrupt or foreign file becomes a clear user error."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # noqa: BLE001 - protobuf and checker errors vary; any means "not a valid model"
        raise EdgekdError(f"{path} is not a valid ONNX model ({first_line(error)}); "
                          "give a model.onnx written by `edgekd export`") from error
    return model


def classifier_input_shape(path: Path) -> tuple[int, int, int]:
    """Check that `path` is an image classifier ONNX Runtime can run (one N x C x H x W float input, N x classes
    output) and return its (C, H, W); a corrupt or foreign file is a clear error instead of an ORT traceback."""
    check_model(path)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ORT raises several types for a model it cannot run
        raise EdgekdError(f"onnxruntime cannot load {path}: {first_line(error)}") from error
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else []
    if len(shape) != 4 or inputs[0].type != "tensor(float)" or not all(isinstance(d, int) for d in shape[1:]) \
            or len(outputs) != 1 or len(outputs[0].shape) != 2:
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise EdgekdError(f"{path} is not an image classifier (edgekd wants one float N x C x H x W input and N x "
                          f"classes logits; it has {found}); give a model.onnx written by `edgekd export`")
    return int(shape[1]), int(shape[2]), int(shape[3])


def is_transformer(model: onnx.ModelProto) -> bool:
    """Attention models (Softmax + MatMul + LayerNormalization, or ORT's fused Attention op): int8 quantizes their
    weight MatMuls only."""
    ops = {node.op_type for node in model.graph.node}
    norms = bool(ops & {"LayerNormalization", "SkipLayerNormalization", "ReduceMean"})
    return norms and ("Attention" in ops or {"Softmax", "MatMul"} <= ops)


def optimize_graph(path: Path) -> None:
    """Rewrite `path` in place with ORT's hardware-independent (basic) optimisations.

    Only the basic level is saved: extended/layout optimisations are specific to the machine that runs them,
    and ORT applies them itself when the app creates its session. Transformers get no onnxruntime.transformers
    fusions either: on CPU their SkipLayerNormalization kernels made DeiT-tiny slower, fp32 and int8 alike
    (benchmarks/results/quantization_host.md, "fp32 (transformer fusions)" row). Nor does this export fuse timm's
    attention into ORT's Attention contrib op: fp32 gains 4-7% from it and static int8 loses (the QDQ quantizer has
    no int8 Attention); dynamic int8, which runs it as QAttention and gains 6-11%, is quantized from a second,
    fused export (attention_fusion.py).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(str(path))


@contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Mute the root-logger chatter of onnxruntime's Python tools (quantizer, fusions): per-tensor notes, not news.

    They log through the root logger and loggers named after their modules, so the root level is raised briefly;
    the calibrators print their progress ("Collecting tensor data and making histogram ...") to standard output,
    which goes to the debug log instead.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.setLevel(level)
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("onnxruntime: %s", line.strip())

