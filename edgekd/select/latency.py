"""THE one ONNX Runtime timing routine: candidate selection, `edgekd bench` and probe packs all time models with it.

Fixed intra-op threads, a warm-up, then runs until there are enough runs and enough seconds for a stable
median; p50/p90/p99 of the per-run wall time. This file needs only onnxruntime and numpy: probe packs copy it
verbatim next to their runner, so a device times models exactly as edgekd does here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

try:
    from edgekd.errors import EdgekdError
except ImportError:  # inside a probe pack, where edgekd is not installed
    class EdgekdError(Exception):  # type: ignore[no-redef]
        """A problem the user can fix."""

XNNPACK = "XnnpackExecutionProvider"
# What ONNX Runtime raises when a model loads but a kernel refuses it at run time (e.g. QLinearConv on some
# depthwise convolutions of tiny maps): that form cannot ship, and callers go on with the others.
ORT_RUN_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                  ort.capi.onnxruntime_pybind11_state.RuntimeException)
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class LatencyStats:
    """Per-call wall time of one model on one session configuration, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    std_ms: float
    runs: int
    warmup: int
    threads: int
    batch: int
    providers: tuple[str, ...]  # what the session really used (a missing provider falls back to CPU)
    input_shape: tuple[int, ...]
    session_ms: float  # InferenceSession creation (graph optimisation, kernel selection): an app's start-up cost
    ort_version: str

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["providers"], raw["input_shape"] = list(self.providers), list(self.input_shape)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatencyStats:
        return cls(**{**raw, "providers": tuple(raw["providers"]), "input_shape": tuple(raw["input_shape"])})


def measure_onnx(path: str | Path, input_shape: Sequence[int] | None = None, *, threads: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",), batch: int = 1, warmup: int = 10,
                 min_runs: int = 30, max_runs: int = 1000, min_seconds: float = 1.0, max_seconds: float = 20.0,
                 allow_provider_fallback: bool = False, seed: int = 0) -> LatencyStats:
    """Time `path` on random inputs: `warmup` untimed runs, then timed runs until both `min_runs` and
    `min_seconds` are reached, stopping early at `max_runs` or (after 5 runs) `max_seconds`.

    `input_shape` is (C, H, W) (batched with `batch`) or a full shape; None reads it from the model, which must
    then have only a symbolic batch axis. A provider this onnxruntime lacks is an error, unless
    `allow_provider_fallback` (probe packs: measure what the device has, and record it).
    """
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"no ONNX model at {path}; export one first")
    if threads < 1 or batch < 1 or min_runs < 1 or warmup < 0:
        raise EdgekdError(f"threads ({threads}), batch ({batch}) and min_runs ({min_runs}) must be at least 1")
    chosen = _usable_providers(providers, allow_provider_fallback)
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), _session_options(threads, chosen), providers=chosen,
                                   provider_options=[_provider_options(p, threads) for p in chosen])
    session_ms = (time.perf_counter() - started) * 1e3
    feed = _random_feed(session, input_shape, batch, seed)
    for _ in range(warmup):
        session.run(None, feed)
    times = _timed_runs(session, feed, min_runs, max_runs, min_seconds, max_seconds)
    shape = next(iter(feed.values())).shape
    return LatencyStats(p50_ms=_pct(times, 50), p90_ms=_pct(times, 90), p99_ms=_pct(times, 99),
                        mean_ms=float(times.mean()), min_ms=float(times.min()), std_ms=float(times.std()),
                        runs=len(times), warmup=warmup, threads=threads, batch=int(shape[0]),
                        providers=tuple(session.get_providers()), input_shape=tuple(int(d) for d in shape),
                        session_ms=session_ms, ort_version=ort.__version__)


def _usable_providers(providers: Sequence[str], allow_fallback: bool) -> list[str]:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing and not allow_fallback:
        raise EdgekdError(f"this onnxruntime ({ort.__version__}) lacks {', '.join(missing)} "
                          f"(it has {', '.join(available)}); install a build with it, or measure on the device "
                          "with a probe pack")
    chosen = [p for p in providers if p in available]
    return chosen or ["CPUExecutionProvider"]


def _session_options(threads: int, providers: list[str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if XNNPACK in providers:  # ORT's XNNPACK guidance: XNNPACK owns the thread pool, ORT's own stays at one thread
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        options.intra_op_num_threads = threads
    return options


def _provider_options(provider: str, threads: int) -> dict[str, str]:
    return {"intra_op_num_threads": str(threads)} if provider == XNNPACK else {}


def _random_feed(session: ort.InferenceSession, input_shape: Sequence[int] | None, batch: int,
                 seed: int) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise EdgekdError(f"the model has {len(inputs)} inputs; edgekd times single-input image models")
    meta = inputs[0]
    if input_shape is None:
        shape = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(meta.shape)]
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise EdgekdError(f"input {meta.name!r} has symbolic dimensions {meta.shape}; pass input_shape=(C, H, W)")
    else:
        shape = [batch, *input_shape] if len(input_shape) == 3 else list(input_shape)
    dtype = _ORT_DTYPES.get(meta.type)
    if dtype is None:
        raise EdgekdError(f"input {meta.name!r} is {meta.type}; edgekd times float image inputs")
    return {meta.name: np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def _timed_runs(session: ort.InferenceSession, feed: dict[str, np.ndarray], min_runs: int, max_runs: int,
                min_seconds: float, max_seconds: float) -> np.ndarray:
    times: list[float] = []
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        session.run(None, feed)
        after = time.perf_counter()
        times.append((after - before) * 1e3)
        elapsed = after - started
        enough = len(times) >= min_runs and elapsed >= min_seconds
        if enough or len(times) >= max_runs or (elapsed >= max_seconds and len(times) >= 5):
            return np.asarray(times)


def _pct(times: np.ndarray, q: float) -> float:
    return float(np.percentile(times, q))
