"""The one timing routine: real ONNX files of real timm models, real ONNX Runtime sessions."""

import pytest
import timm

from edgekd.errors import EdgekdError
from edgekd.deploy.export import export_onnx
from edgekd.select.latency import LatencyStats, measure_onnx

FAST = dict(warmup=2, min_runs=8, min_seconds=0.0)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "test_resnet.onnx"
    return export_onnx(timm.create_model("test_resnet", num_classes=5).eval(), path, (3, 32, 32))


def test_stats_are_ordered_and_describe_the_session(onnx_path):
    stats = measure_onnx(onnx_path, (3, 32, 32), threads=1, **FAST)
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.runs >= 8 and stats.warmup == 2 and stats.threads == 1
    assert stats.batch == 1 and stats.input_shape == (1, 3, 32, 32)
    assert stats.providers == ("CPUExecutionProvider",) and stats.session_ms > 0
    assert LatencyStats.from_dict(stats.to_dict()) == stats


def test_batch_and_shape_from_the_model(onnx_path):
    stats = measure_onnx(onnx_path, None, batch=3, **FAST)
    assert stats.input_shape == (3, 3, 32, 32) and stats.batch == 3


def test_run_count_bounds(onnx_path):
    assert measure_onnx(onnx_path, (3, 32, 32), warmup=0, min_runs=5, max_runs=5, min_seconds=60).runs == 5
    assert measure_onnx(onnx_path, (3, 32, 32), warmup=0, min_runs=40, min_seconds=0).runs == 40


def test_missing_provider_is_an_error_unless_fallback_is_allowed(onnx_path):
    with pytest.raises(EdgekdError, match="lacks NoSuchExecutionProvider"):
        measure_onnx(onnx_path, (3, 32, 32), providers=("NoSuchExecutionProvider", "CPUExecutionProvider"), **FAST)
    stats = measure_onnx(onnx_path, (3, 32, 32), providers=("NoSuchExecutionProvider",),
                         allow_provider_fallback=True, **FAST)
    assert stats.providers == ("CPUExecutionProvider",)


def test_bad_inputs(tmp_path, onnx_path):
    with pytest.raises(EdgekdError, match="no ONNX model"):
        measure_onnx(tmp_path / "missing.onnx")
    with pytest.raises(EdgekdError, match="at least 1"):
        measure_onnx(onnx_path, threads=0)
