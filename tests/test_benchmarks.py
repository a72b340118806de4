"""The benchmark scripts keep running as the code under them changes (tiny models, one step: not a measurement), and
their committed tables are what they render from their committed figures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_distill_throughput_benchmark_runs_on_tiny_models(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_throughput.py"), "--teacher",
                             "test_vit", "--student", "test_efficientnet", "--size", "32", "--classes", "10",
                             "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "1",
                             "--precisions", "fp32,auto", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    cases = [(r["setting"], r["case"]) for r in record["rows"]]
    assert cases == [(s, c) for s in ("fp32", "auto") for c in ("teacher forward", "distill ce+kd",
                                                                 "distill ce+kd+fitnet", "distill ce+kd cached",
                                                                 "distill from random")]
    assert all(r["images_per_s"] > 0 for r in record["rows"])
    markdown = out.with_suffix(".md").read_text()
    assert "## What limits it" in markdown and "**auto**" in markdown
    assert markdown.count("the default from random weights (cached, with half a batch of mixups") == 2
    assert out.with_suffix(".png").stat().st_size > 1000


def test_quantization_memory_benchmark_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantization_memory.py"), "--models",
                             "test_efficientnet", "--steps", "percentile,sensitivity", "--size", "32", "--out",
                             str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["runs"]["now"]
    assert [row["step"] for row in rows] == ["percentile", "sensitivity"], rows
    assert all(row["peak_mb"] >= row["before_mb"] > 100 for row in rows), rows  # each a process of its own
    assert "| test_efficientnet | percentile |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("script", ["int8_graph_forms", "int8_float_head", "quantization_memory", "label_free_drop"])
def test_committed_tables_are_their_json_rendered(script):
    """A results table is what its script renders from the committed figures, not edited by hand."""
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = ROOT / "benchmarks" / "results"
    figures = json.loads((results / f"{script}.json").read_text())
    assert module.render(figures) == (results / f"{script}.md").read_text()
