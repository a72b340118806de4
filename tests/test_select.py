"""Budget parsing, the selection rule, and selection on this machine with real tiny timm candidates."""

import json
import math
import re
import shutil

import pytest
from typer.testing import CliRunner

from edgekd.select.candidates import PoolEntry, TimingConfig, choose_student, measure_candidates
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.deploy.export import export_onnx
from edgekd.select.latency import LatencyStats, measure_onnx
from edgekd.select.profiles import profile_from_dict
from edgekd.select.rule import (DERIVED_FAMILY, Budget, Candidate, Measurement, format_table, parse_budget,
                               select_student)
from edgekd.distill.students import build_student

FAST = TimingConfig(warmup=2, min_runs=8, min_seconds=0.0)
POOL = (PoolEntry("test_resnet", "efficient CNN", 60.0, "test"), PoolEntry("test_efficientnet", "efficient CNN", 70.0,
                                                                            "test"))
TINY = ["test_resnet", "test_efficientnet", "derived:test_vit:depth=0.5"]


@pytest.mark.parametrize("text, ms", [("10ms", 10.0), ("2.5 ms", 2.5), ("0.01s", 10.0), (" 7MS ", 7.0),
                                      ("500us", 0.5), (".5ms", 0.5)])
def test_budget_accepts_durations(text, ms):
    assert math.isclose(parse_budget(text).ms, ms) and parse_budget(text).speedup is None


@pytest.mark.parametrize("text, speedup", [("4x", 4.0), ("2.5 X", 2.5), (" 1x ", 1.0)])
def test_budget_accepts_a_speed_up_over_the_teacher(text, speedup):
    assert parse_budget(text) == Budget(speedup=speedup) and str(parse_budget(text)).endswith("faster than the teacher")


@pytest.mark.parametrize("text, message", [("0", "positive"), ("0ms", "positive"), ("-5ms", "positive"),
                                           ("ten ms", "not a duration"), ("10", "no unit"), ("", "not a duration"),
                                           ("10 min", "not a duration"), ("nan ms", "not a duration"),
                                           ("0.25x", "at least 1x"), ("-2x", "at least 1x"), ("10", "or 10x")])
def test_budget_rejects_bad_input(text, message):
    with pytest.raises(EdgekdError, match=message):
        parse_budget(text)


def stats(p50: float, p90: float) -> LatencyStats:
    return LatencyStats(p50_ms=p50, p90_ms=p90, p99_ms=p90, mean_ms=p50, min_ms=p50, std_ms=0.0, runs=30, warmup=10,
                        threads=1, batch=1, providers=("CPUExecutionProvider",), input_shape=(1, 3, 32, 32),
                        session_ms=1.0, ort_version="x")


def candidate(name: str, top1: float | None, *forms: tuple[str, float, float], family: str = "efficient CNN",
              macs: int = 1, start: str | None = None) -> Candidate:
    start = start or ("teacher-derived" if family == DERIVED_FAMILY else "pretrained")
    return Candidate(name, family, 1000, macs, (3, 32, 32), top1, "test",
                     tuple(Measurement(p, stats(p50, p90), "test") for p, p50, p90 in forms), start=start)


def test_best_form_is_the_lowest_p90():
    c = candidate("m", 70.0, ("fp32", 1.0, 1.2), ("int8_static", 1.5, 1.9), ("int8_dynamic", 9.0, 12.0))
    assert c.best.precision == "fp32"


def test_rule_picks_the_most_accurate_that_fits():
    pool = [candidate("fast", 60.0, ("fp32", 1, 2)), candidate("accurate", 80.0, ("int8_static", 4, 5)),
            candidate("best_but_slow", 90.0, ("fp32", 9, 30))]
    selection = select_student(pool, 10.0)
    assert selection.chosen.model_name == "accurate" and selection.precision == "int8_static" and selection.fits
    assert "80.0%" in selection.reason and "2 that fit" in selection.reason
    assert [v.fits for v in selection.verdicts] == [True, True, False]


def test_a_fitting_teacher_derived_student_comes_first():
    pool = [candidate("accurate", 80.0, ("fp32", 1, 2)),
            candidate("derived:t:depth=0.5", None, ("fp32", 3, 4), family=DERIVED_FAMILY)]
    assert select_student(pool, 10.0).chosen.derived
    assert select_student(pool, 3.0).chosen.model_name == "accurate"


def test_real_starting_weights_come_before_random_ones():
    """A pretrained candidate beats a random one with a higher published top-1 (which is not its start's)."""
    pool = [candidate("random_but_famous", 80.0, ("fp32", 1, 2), start="random", macs=9),
            candidate("pretrained", 70.0, ("fp32", 1, 2))]
    selection = select_student(pool, 10.0)
    assert selection.chosen.model_name == "pretrained" and "starting from those weights" in selection.reason
    table = format_table(pool, 10.0, ("fp32",), chosen="pretrained")
    assert "(80.0%, not its start)" in table and "random" in table and "70.0%" in table


def test_among_random_starts_the_most_compute_wins_and_the_reason_says_random():
    pool = [candidate("small_famous", 80.0, ("fp32", 1, 2), start="random", macs=5),
            candidate("big", 60.0, ("fp32", 1, 2), start="random", macs=50),
            candidate("derived:t:depth=0.5", None, ("fp32", 1, 2), family=DERIVED_FAMILY, start="random")]
    selection = select_student(pool, 10.0)
    assert selection.chosen.model_name == "big" and "RANDOM" in selection.reason


def test_a_checkpoint_start_is_reported_for_a_pinned_student():
    pool = [candidate("a", 60.0, ("fp32", 1, 2)), candidate("b", 70.0, ("fp32", 2, 3), start="checkpoint")]
    assert "starts from checkpoint weights" in select_student(pool, 10.0, student="b").reason


def test_budget_below_the_fastest_names_it():
    pool = [candidate("a", 60.0, ("fp32", 4, 5)), candidate("b", 70.0, ("fp32", 2, 3.14))]
    with pytest.raises(EdgekdError, match=r"fastest is b at p90 3\.14 ms \(fp32\)"):
        select_student(pool, 1.0)


def test_pinned_student_reports_whether_it_fits():
    pool = [candidate("a", 60.0, ("fp32", 1, 2)), candidate("b", 70.0, ("fp32", 20, 30))]
    pinned = select_student(pool, 10.0, student="b")
    assert pinned.pinned and not pinned.fits and "does NOT fit" in pinned.reason
    with pytest.raises(EdgekdError, match="not among"):
        select_student(pool, 10.0, student="zzz")


def test_unmeasured_candidates_are_reported_not_chosen():
    broken = Candidate("broken", "efficient CNN", 0, 0, (0, 0, 0), 99.0, "test", error="cannot build")
    selection = select_student([broken, candidate("ok", 50.0, ("fp32", 1, 2))], 10.0)
    assert selection.chosen.model_name == "ok"
    assert "cannot build" in format_table([broken], 10.0, ("fp32",))


@pytest.fixture(scope="module")
def host():
    return profile_from_dict({"name": "host-test", "providers": ["CPUExecutionProvider"], "threads": 1, "batch": 1,
                              "input_size": 32, "precisions": ["fp32", "int8_static", "int8_dynamic"],
                              "isa": "avx2", "latency": "host"})


@pytest.fixture(scope="module")
def measured(host, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = measure_candidates(TINY, host, num_classes=10, image_size=(32, 32), pool=POOL, cache_dir=cache,
                               timing=FAST)
    return first, cache


def test_every_candidate_is_measured_in_every_precision(measured, host):
    candidates, _ = measured
    assert [c.model_name for c in candidates] == TINY
    for c in candidates:
        assert c.params > 0 and c.macs > 0 and c.input_size == (3, 32, 32)
        assert [m.precision for m in c.measurements] == list(host.precisions)
        assert all(m.stats is not None and m.stats.threads == 1 for m in c.measurements), c.measurements
    assert candidates[2].family == DERIVED_FAMILY and candidates[2].top1 is None


def test_second_selection_reads_the_cache(measured, host):
    first, cache = measured
    second = measure_candidates(TINY, host, num_classes=10, image_size=(32, 32), pool=POOL, cache_dir=cache,
                                timing=FAST)
    assert all("cached" in m.source for c in second for m in c.measurements)
    assert [m.stats for c in second for m in c.measurements] == [m.stats for c in first for m in c.measurements]
    other_classes = measure_candidates(TINY[:1], host, num_classes=7, image_size=(32, 32), pool=POOL,
                                       cache_dir=cache, timing=FAST)
    assert not any("cached" in m.source for m in other_classes[0].measurements)


def test_chosen_student_fits_when_measured_again(host, measured, tmp_path):
    _, cache = measured
    selection = choose_student("test_vit", 50.0, host, num_classes=10, names=TINY, pool=POOL, cache_dir=cache,
                               timing=FAST)
    assert selection.fits and selection.chosen.model_name in TINY
    path = export_onnx(build_student(selection.chosen.model_name, 10, (32, 32)).eval(), tmp_path / "s.onnx",
                       (3, 32, 32))
    assert measure_onnx(path, (3, 32, 32), threads=1, warmup=2, min_runs=8, min_seconds=0).p50_ms <= 50.0


def test_a_stale_optimistic_cache_entry_is_caught_by_measuring_the_choice_again(measured, host, tmp_path):
    """The rule prefers the derived student; a cached figure from 'a quiet moment' says it takes 0.1 us."""
    _, cache = measured
    stale = tmp_path / "cache"
    shutil.copytree(cache, stale)
    planted = 0
    for path in stale.glob("*.json"):
        raw = json.loads(path.read_text())
        if raw["key"].get("kind") == "latency" and raw["key"]["model"] == TINY[2]:
            raw["value"]["stats"].update(p50_ms=1e-4, p90_ms=1e-4)
            path.write_text(json.dumps(raw))
            planted += 1
    assert planted == len(host.precisions)
    with pytest.raises(EdgekdError, match="no candidate fits 0.001 ms"):
        choose_student("test_vit", 0.001, host, num_classes=10, names=TINY, pool=POOL, cache_dir=stale, timing=FAST)
    again = measure_candidates(TINY[2:], host, num_classes=10, image_size=(32, 32), pool=POOL, cache_dir=stale,
                               timing=FAST)[0]
    assert again.best.p90_ms > 1e-3  # the median of the kept runs stands in the cache: no longer the stale figure
    selection = choose_student("test_vit", 50.0, host, num_classes=10, names=TINY, pool=POOL, cache_dir=stale,
                               timing=FAST)
    assert selection.chosen.model_name == TINY[2] and "the median counts" in selection.chosen.best.source
    assert selection.chosen.best.p90_ms > 1e-3


def _plant(cache, model: str, p90_ms: float) -> int:
    """Every cached latency of `model` replaced by one run at `p90_ms`; the number of forms planted."""
    planted = 0
    for path in cache.glob("*.json"):
        raw = json.loads(path.read_text())
        if raw["key"].get("kind") == "latency" and raw["key"]["model"] == model:
            raw["value"] = {"stats": {**raw["value"]["stats"], "p50_ms": p90_ms, "p90_ms": p90_ms}}
            path.write_text(json.dumps(raw))
            planted += 1
    return planted


def test_a_stale_pessimistic_near_miss_the_rule_prefers_is_measured_again(measured, host, tmp_path):
    """A cached figure from 'a busy moment' puts the derived student (the rule's first preference) just over the
    budget: it is timed again, three runs' median decides, and it is chosen. Far over, it is left as cached."""
    first, cache = measured
    budget = 3 * max(c.best.p90_ms for c in first)  # every candidate fits it, measured quietly
    near = tmp_path / "near"
    shutil.copytree(cache, near)
    assert _plant(near, TINY[2], 1.1 * budget) == len(host.precisions)
    assert select_student(measure_candidates(TINY, host, num_classes=10, image_size=(32, 32), pool=POOL,
                                             cache_dir=near, timing=FAST), budget).chosen.model_name != TINY[2]
    selection = choose_student("test_vit", budget, host, num_classes=10, names=TINY, pool=POOL, cache_dir=near,
                               timing=FAST)
    assert selection.chosen.model_name == TINY[2] and selection.chosen.best.p90_ms <= budget
    derived = next(v.candidate for v in selection.verdicts if v.candidate.model_name == TINY[2])
    assert all("3 times (p90" in m.source for m in derived.measurements), derived.measurements
    far = tmp_path / "far"
    shutil.copytree(cache, far)
    _plant(far, TINY[2], 2 * budget)
    selection = choose_student("test_vit", budget, host, num_classes=10, names=TINY, pool=POOL, cache_dir=far,
                               timing=FAST)
    derived = next(v.candidate for v in selection.verdicts if v.candidate.model_name == TINY[2])
    assert selection.chosen.model_name != TINY[2]
    assert all(m.source.endswith("(cached)") and m.p90_ms == 2 * budget for m in derived.measurements)


def test_cli_select_prints_the_table_and_the_choice(measured, tmp_path):
    _, cache = measured
    args = ["select", "--teacher", "test_vit", "--profile", "host", "--num-classes", "10", "--input-size", "32",
            "--candidates", ",".join(TINY), "--cache-dir", str(cache)]
    runner = CliRunner()
    relative = runner.invoke(app, [*args, "--budget", "1x"])  # as fast as the teacher: its fp32 p90 here
    assert relative.exit_code == 0, relative.output
    teacher_p90 = float(re.search(r"test_vit's fp32 p90 ([\d.]+) ms on host", relative.output)[1])
    budget = float(re.search(r"budget ([\d.e-]+) ms p90", relative.output)[1])
    assert math.isclose(budget, teacher_p90, rel_tol=1e-2) and "1x faster than the teacher" in relative.output
    low = runner.invoke(app, [*args, "--budget", "0.001ms"])
    assert low.exit_code == 2 and "no candidate fits 0.001 ms: the fastest is" in low.output
    assert all(name in low.output for name in TINY) and "too slow" in low.output
    pinned = runner.invoke(app, [*args, "--budget", "0.001ms", "--student", "test_resnet"])
    assert pinned.exit_code == 0 and "does NOT fit" in pinned.output
