"""Probe packs: written here, run in a fresh environment holding only onnxruntime and numpy, read back as a profile."""

import json
import math
import os
import re
import subprocess
import venv
from dataclasses import replace
from pathlib import Path

import numpy
import onnxruntime
import pytest

from edgekd.deploy.bundle import BundleOptions, bundle_from_checkpoint
from edgekd.select.candidates import PoolEntry, TimingConfig, measure_candidates, resolve_budget
from edgekd.errors import EdgekdError
from edgekd.select.probe import TABLE_NAME, write_probe_pack
from edgekd.select.profiles import load_profile
from edgekd.deploy.guard import GuardConfig
from edgekd.select.rule import parse_budget, select_student
from edgekd.distill.students import read_student_checkpoint
from tests.helpers.tiny_students import tiny_student

NAMES = ["test_resnet", "derived:test_vit:depth=0.5"]
POOL = (PoolEntry("test_resnet", "efficient CNN", 60.0, "test"),)
PROFILE = """
name = "board"
description = "a device we cannot run on here"
providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]
threads = 1
batch = 1
input_size = 32
precisions = ["fp32", "int8_dynamic"]
isa = "arm64"
latency = "probe"
"""


def bare_python(root: Path) -> Path:
    """A fresh virtual environment whose only third-party packages are onnxruntime and numpy (linked, offline)."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    for package in (onnxruntime, numpy):
        source = Path(package.__file__).parent
        for item in [source, source.with_name(source.name + ".libs")]:
            if item.exists():
                (site / item.name).symlink_to(item)
    return python


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    (root / "board.toml").write_text(PROFILE)
    profile = load_profile(str(root / "board.toml"))
    previous = os.getcwd()
    os.chdir(root)  # --out as the README writes it, relative (the int8 forms were once lost that way)
    try:
        runner = write_probe_pack("test_vit", profile, Path("pack"), num_classes=10, names=NAMES,
                                  timing=TimingConfig(warmup=2, min_runs=8, min_seconds=0.0))
    finally:
        os.chdir(previous)
    return root, profile, root / runner


def test_pack_holds_every_deployment_form_and_a_standalone_runner(pack):
    root, profile, runner = pack
    manifest = json.loads((runner.parent / "pack.json").read_text())
    assert {(m["model_name"], m["precision"]) for m in manifest["models"]} == \
        {(n, p) for n in NAMES for p in profile.precisions} | {("test_vit", "fp32")}  # the teacher, as the user has it
    assert all((runner.parent / m["file"]).is_file() for m in manifest["models"]) and not manifest["not_exported"]
    assert manifest["profile"]["name"] == "board"
    assert not re.search(r"^\s*(from|import) (edgekd|torch|timm)\b", runner.read_text(), re.M)


def test_a_probe_profile_is_not_timed_here(pack):
    _, profile, _ = pack
    with pytest.raises(EdgekdError, match="probe-pack"):
        measure_candidates(NAMES, profile, num_classes=10, image_size=(32, 32))


@pytest.fixture(scope="module")
def device_table(pack, tmp_path_factory) -> Path:
    """The pack run in a fresh environment with only onnxruntime and numpy, as on the device: its latency table."""
    _, _, runner = pack
    python = bare_python(tmp_path_factory.mktemp("venv"))
    isolated = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert isolated.returncode != 0  # nothing but onnxruntime and numpy there
    done = subprocess.run([python, str(runner)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return runner.parent / TABLE_NAME


def test_runner_in_a_bare_environment_and_its_table_as_profile(device_table, tmp_path):
    table = json.loads(device_table.read_text())
    assert all("stats" in row for row in table["rows"]) and table["device"]["onnxruntime"] == onnxruntime.__version__

    profile = load_profile(str(device_table))
    assert profile.latency == "table" and profile.table_path == device_table and profile.isa == "arm64"
    candidates = measure_candidates(NAMES + ["test_efficientnet"], profile, num_classes=10, image_size=(32, 32),
                                    pool=POOL, cache_dir=tmp_path / "cache")
    by_name = {c.model_name: c for c in candidates}
    for name in NAMES:
        assert all(m.stats is not None and "table" in m.source for m in by_name[name].measurements)
    assert all("not in the latency table" in m.error for m in by_name["test_efficientnet"].measurements)
    assert select_student(candidates, 1000.0).chosen.model_name == "derived:test_vit:depth=0.5"
    # a relative budget divides the teacher's fp32 p90 on the device (its row in the table), not a host timing
    teacher_p90 = next(row["stats"]["p90_ms"] for row in table["rows"]
                       if (row["model_name"], row["precision"]) == ("test_vit", "fp32"))
    resolved = resolve_budget(parse_budget("2x"), "test_vit", profile, num_classes=10, image_size=(32, 32),
                              cache_dir=tmp_path / "cache")
    assert math.isclose(resolved.ms, teacher_p90 / 2, rel_tol=5e-3) and "test_vit's fp32 p90" in resolved.source
    with pytest.raises(EdgekdError, match=r"--budget 2x needs the teacher's own latency on .*not in the latency table"):
        resolve_budget(parse_budget("2x"), "test_efficientnet", profile, num_classes=10, image_size=(32, 32),
                       cache_dir=tmp_path / "cache")
    # the table at another input size than the one asked for: the error says so, not only "check the providers"
    other_size = measure_candidates(NAMES, profile, num_classes=10, image_size=(48, 48), pool=POOL,
                                    cache_dir=tmp_path / "cache")
    with pytest.raises(EdgekdError, match=r"measured at 32x32 px, not 48x48: pass --input-size 32"):
        select_student(other_size, 1000.0)


def test_int8_pays_or_not_by_the_device_s_latencies(device_table, small_fmnist, tmp_path):
    """On a probe-pack profile the guard compares the device's p50s from the table, never host timings; a form
    the device could not run does not ship."""
    checkpoint = read_student_checkpoint(tiny_student("test_resnet", small_fmnist))
    rows = {(r["model_name"], r["precision"]): r for r in json.loads(device_table.read_text())["rows"]}
    device_ms = {p: rows[("test_resnet", p)]["stats"]["p50_ms"] for p in ("fp32", "int8_dynamic")}
    profile = load_profile(str(device_table))
    options = BundleOptions(isa=profile.isa, precisions=("int8_dynamic",), time_models=False,
                            latency_table=device_table, guard=GuardConfig(max_accuracy_drop=100.0))
    decision = bundle_from_checkpoint(checkpoint, tmp_path / "bundle", small_fmnist, options).decision
    assert decision.fp32_latency_ms == device_ms["fp32"]
    assert decision.trials[-1].latency_ms == device_ms["int8_dynamic"] and "latency table" in decision.reason
    assert decision.precision == ("int8_dynamic" if device_ms["int8_dynamic"] * 1.05 < device_ms["fp32"] else "fp32")

    failed = json.loads(device_table.read_text())  # the same device, where int8 failed to run
    for row in failed["rows"]:
        if row["precision"] == "int8_dynamic":
            row["error"] = "NOT_IMPLEMENTED: DynamicQuantizeLinear"
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    options = replace(options, latency_table=tmp_path / "failed.json")
    decision = bundle_from_checkpoint(checkpoint, tmp_path / "bundle2", small_fmnist, options).decision
    assert decision.precision == "fp32" and "cannot be shown to pay" in decision.trials[-1].error
    # the reason says it was the missing timing, not the accuracy guard
    assert "stayed within the accuracy guard, but no int8_dynamic latency" in decision.reason, decision.reason


def test_pack_refuses_a_folder_that_is_not_a_pack(pack, tmp_path):
    _, profile, _ = pack
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EdgekdError, match="not a probe pack"):
        write_probe_pack("test_vit", profile, tmp_path, num_classes=10, names=NAMES[:1])
