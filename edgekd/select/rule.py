"""Pure student selection: a latency budget and measured candidates in, a Selection with its reasons out.

The rule (printed with every selection): among candidates whose measured p90 fits the budget, those that will
start from real weights (a --student-checkpoint, the teacher's own for a teacher-derived student, timm's pretrained
ImageNet weights) come before those that would start from random weights. Among real starts: a teacher-derived
student first, then the highest published ImageNet-1k top-1, which is a proxy only for the pretrained weights it
was measured on. A randomly initialised candidate has no such proxy: among those, the most MACs the budget buys
(capacity) ranks first. Ties go to the lower p90. A candidate's latency is its fastest deployment form among the
profile's precisions.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.select.latency import LatencyStats

RULE = ("among candidates whose measured p90 fits the budget, real starting weights first (checkpoint, "
        "teacher-derived, pretrained) before random ones; among real starts a teacher-derived student first, then "
        "the highest published ImageNet-1k top-1 (a proxy for the pretrained weights only); among random starts the "
        "most MACs; ties: lower p90")
DERIVED_FAMILY = "teacher-derived"

_BUDGET_RE = re.compile(r"^\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(?P<unit>ms|s|us|µs)?\s*$", re.I)
_UNIT_MS = {"ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}
_SPEEDUP_RE = re.compile(r"^\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*x\s*$", re.I)


@dataclass(frozen=True)
class Measurement:
    """One deployment form (precision) of one candidate, timed on the profile's device."""

    precision: str
    stats: LatencyStats | None  # None when the form could not be made or run
    source: str  # where the figure comes from, e.g. "measured on host" or "probe table <file>"
    error: str | None = None

    @property
    def p50_ms(self) -> float:
        return self.stats.p50_ms if self.stats is not None else math.inf

    @property
    def p90_ms(self) -> float:
        return self.stats.p90_ms if self.stats is not None else math.inf


@dataclass(frozen=True)
class Candidate:
    """A student architecture at the task's input size and classes, with its measured deployment forms."""

    model_name: str
    family: str
    params: int
    macs: int  # multiply-accumulates of one image
    input_size: tuple[int, int, int]
    top1: float | None  # published ImageNet-1k top-1 (%); None for teacher-derived students
    top1_source: str
    measurements: tuple[Measurement, ...] = ()
    error: str | None = None  # why the candidate could not be built at all
    start: str = "random"  # checkpoint, teacher-derived, pretrained or random: what training would start from

    @property
    def best(self) -> Measurement | None:
        """The fastest measured form (lowest p90: the figure the budget is checked against)."""
        measured = [m for m in self.measurements if m.stats is not None]
        return min(measured, key=lambda m: m.p90_ms) if measured else None

    def form(self, precision: str) -> Measurement | None:
        """The measured form in `precision` (None: not among the profile's precisions, or it failed)."""
        return next((m for m in self.measurements if m.precision == precision and m.stats is not None), None)

    @property
    def derived(self) -> bool:
        return self.family == DERIVED_FAMILY

    @property
    def real_start(self) -> bool:
        return self.start != "random"


@dataclass(frozen=True)
class Verdict:
    """One row of the selection table."""

    candidate: Candidate
    fits: bool | None  # None: no measurement
    note: str


@dataclass(frozen=True)
class PassedOver:
    """A candidate that was chosen, distilled and exported, then given up: the form that could ship missed the budget
    (its int8 form, the one that fitted, lost too much accuracy)."""

    model_name: str
    shipped_precision: str
    p90_ms: float | None
    why: str


@dataclass(frozen=True)
class Selection:
    chosen: Candidate
    precision: str  # the chosen deployment form
    budget_ms: float
    fits: bool
    pinned: bool  # the user named the student (--student)
    reason: str
    verdicts: tuple[Verdict, ...]  # every candidate, in table order
    rule: str = RULE
    passed_over: tuple[PassedOver, ...] = ()  # earlier choices whose shipped form missed the budget, in order
    budget_source: str = ""  # how a relative budget became budget_ms ("4x faster than ..."); "" for one in ms

    def p90_of(self, precision: str) -> float | None:
        """The chosen candidate's measured p90 in `precision` on the profile (None: not measured)."""
        form = self.chosen.form(precision)
        return form.p90_ms if form else None

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.model_name, "precision": self.precision, "budget_ms": self.budget_ms,
                "fits": self.fits, "pinned": self.pinned, "reason": self.reason, "rule": self.rule,
                "passed_over": [asdict(p) for p in self.passed_over], "budget_source": self.budget_source,
                "verdicts": [{"candidate": _candidate_to_dict(v.candidate), "fits": v.fits, "note": v.note}
                             for v in self.verdicts]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Selection:
        verdicts = tuple(Verdict(_candidate_from_dict(v["candidate"]), v["fits"], v["note"]) for v in raw["verdicts"])
        chosen = next(v.candidate for v in verdicts if v.candidate.model_name == raw["chosen"])
        return cls(chosen=chosen, precision=raw["precision"], budget_ms=float(raw["budget_ms"]), fits=raw["fits"],
                   pinned=raw["pinned"], reason=raw["reason"], verdicts=verdicts, rule=raw["rule"],
                   passed_over=tuple(PassedOver(**p) for p in raw.get("passed_over", [])),
                   budget_source=raw.get("budget_source", ""))


def _candidate_to_dict(candidate: Candidate) -> dict[str, Any]:
    raw = asdict(candidate)
    raw["measurements"] = [{"precision": m.precision, "stats": m.stats.to_dict() if m.stats else None,
                            "source": m.source, "error": m.error} for m in candidate.measurements]
    return raw


def _candidate_from_dict(raw: dict[str, Any]) -> Candidate:
    measurements = tuple(Measurement(m["precision"], LatencyStats.from_dict(m["stats"]) if m["stats"] else None,
                                     m["source"], m["error"]) for m in raw["measurements"])
    return Candidate(**{**raw, "input_size": tuple(raw["input_size"]), "measurements": measurements})


@dataclass(frozen=True)
class Budget:
    """`--budget`: a latency per image (`ms`), or a speed-up over the teacher (`speedup`: `4x` is the teacher's fp32
    p90 on the same profile divided by 4), which means the same on a fast machine and a slow one."""

    ms: float | None = None
    speedup: float | None = None

    def __str__(self) -> str:
        return f"{self.ms:g} ms" if self.ms is not None else f"{self.speedup:g}x faster than the teacher"


def parse_budget(text: str) -> Budget:
    """`--budget`: "10ms", "2.5 ms", "0.01s", "500us" (milliseconds), or "4x" (a speed-up over the teacher)."""
    speedup = _SPEEDUP_RE.match(str(text))
    if speedup:
        value = float(speedup["value"])
        if not (math.isfinite(value) and value >= 1):
            raise EdgekdError(f"--budget {text!r}: a speed-up over the teacher is at least 1x (4x: a quarter of the "
                              "teacher's latency); or give a duration, e.g. 10ms")
        return Budget(speedup=value)
    match = _BUDGET_RE.match(str(text))
    if not match:
        raise EdgekdError(f"--budget {text!r} is not a duration or a speed-up; write it like 10ms, 2.5 ms, 0.01s, "
                          "or 4x (four times faster than the teacher)")
    value = float(match["value"])
    if not (math.isfinite(value) and value > 0):
        raise EdgekdError(f"--budget {text!r} must be a positive, finite duration, e.g. 10ms")
    if match["unit"] is None:
        raise EdgekdError(f"--budget {text!r} has no unit; write {match['value']}ms or {match['value']}s "
                          f"(or {match['value']}x: that many times faster than the teacher)")
    return Budget(ms=value * _UNIT_MS[match["unit"].lower()])


def verdicts(candidates: list[Candidate], budget_ms: float) -> list[Verdict]:
    """Every candidate with fits / does not fit (by its fastest form's p90), fastest first."""
    rows = []
    for candidate in candidates:
        best = candidate.best
        if best is None:
            why = candidate.error or _errors_by_form(candidate)
            rows.append(Verdict(candidate, None, f"not measured: {why or 'no precision measured'}"))
            continue
        fits = best.p90_ms <= budget_ms
        note = f"fits ({best.precision} p90 {best.p90_ms:.2f} <= {budget_ms:g} ms)" if fits else \
            f"too slow (fastest form {best.precision}: p90 {best.p90_ms:.2f} > {budget_ms:g} ms)"
        rows.append(Verdict(candidate, fits, note))
    return sorted(rows, key=lambda v: (v.candidate.best is None, _p90(v.candidate)))


def _errors_by_form(candidate: Candidate) -> str:
    """"fp32, int8_static: not in the latency table; ...": each error once, after the forms it stopped."""
    forms: dict[str, list[str]] = {}
    for measurement in candidate.measurements:
        if measurement.error:
            forms.setdefault(measurement.error, []).append(measurement.precision)
    return "; ".join(f"{', '.join(precisions)}: {error}" for error, precisions in forms.items())


def select_student(candidates: list[Candidate], budget_ms: float, *, student: str | None = None) -> Selection:
    """Apply the rule (see RULE); `student` pins one candidate by name and only reports whether it fits."""
    rows = verdicts(candidates, budget_ms)
    if not any(v.fits is not None for v in rows):
        # the most common reason first (e.g. every row of a device table "measured at (3, 32, 32), not ...")
        reasons = [m.error for v in rows for m in v.candidate.measurements if m.error]
        common = max(set(reasons), key=reasons.count) if reasons else None
        raise EdgekdError("no candidate could be measured" + (f" (most often: {common})" if common else "") +
                          "; check the profile's providers, precisions and input size (--input-size), or pass "
                          "--student with a timm model name")
    if student is not None:
        return _pinned(rows, budget_ms, student)
    fitting = [v.candidate for v in rows if v.fits]
    if not fitting:
        fastest = rows[0].candidate
        form = _best(fastest)
        raise EdgekdError(f"no candidate fits {budget_ms:g} ms: the fastest is {fastest.model_name} at p90 "
                          f"{form.p90_ms:.2f} ms ({form.precision}); raise --budget to at least "
                          f"{math.ceil(form.p90_ms * 100) / 100:g}ms or pick a faster profile")
    chosen = min(fitting, key=rule_rank)
    best = _best(chosen)
    random_note = "" if chosen.real_start else \
        "; it starts from RANDOM weights (none that fit has real ones here; --student-checkpoint gives some)"
    if chosen.start == "checkpoint":
        why = "starts from the given --student-checkpoint"
    elif chosen.derived and chosen.real_start:
        why = "teacher-derived: initialised from the teacher's own weights, the rule's first preference"
    elif chosen.real_start and chosen.top1 is not None:
        why = f"highest published ImageNet-1k top-1 among the {sum(c.real_start for c in fitting)} that fit and " \
              f"start from real weights: {chosen.top1:.1f}% ({chosen.top1_source}), starting from those weights"
    elif chosen.real_start:
        why = f"starts from {chosen.start} weights; no published top-1, the largest ({chosen.params / 1e6:.2f}M " \
              "params) stands in as the most accurate"
    else:
        why = f"the most compute ({chosen.macs / 1e6:.1f}M MACs) among the {len(fitting)} that fit" + random_note
    reason = (f"{chosen.model_name} ({best.precision}, p50 {best.p50_ms:.2f} ms, p90 {best.p90_ms:.2f} ms "
              f"<= {budget_ms:g} ms): {why}")
    return Selection(chosen=chosen, precision=best.precision, budget_ms=budget_ms, fits=True, pinned=False,
                     reason=reason, verdicts=tuple(rows))


def _pinned(rows: list[Verdict], budget_ms: float, student: str) -> Selection:
    match = next((v for v in rows if v.candidate.model_name == student), None)
    if match is None:
        raise EdgekdError(f"--student {student} was not among the measured candidates")
    best = match.candidate.best
    if best is None:
        raise EdgekdError(f"--student {student} could not be measured: {match.note}")
    fits = bool(match.fits)
    verdict = "fits" if fits else "does NOT fit"
    reason = (f"{student} pinned with --student; its fastest form ({best.precision}, p90 {best.p90_ms:.2f} ms) "
              f"{verdict} the {budget_ms:g} ms budget; it starts from {match.candidate.start} weights")
    return Selection(chosen=match.candidate, precision=best.precision, budget_ms=budget_ms, fits=fits, pinned=True,
                     reason=reason, verdicts=tuple(rows))


def _best(candidate: Candidate) -> Measurement:
    best = candidate.best
    assert best is not None, "only measured candidates reach here"
    return best


def _p90(candidate: Candidate) -> float:
    best = candidate.best
    return best.p90_ms if best is not None else math.inf


def rule_rank(c: Candidate) -> tuple:
    """The rule as a sort key (lowest first); see RULE."""
    if not c.real_start:
        return (1, -float(c.macs), _p90(c))
    derived_depth = float(c.macs) if c.derived else 0.0  # more of the teacher kept ranks higher
    return (0, c.start != "checkpoint", not c.derived, -derived_depth, c.top1 is None, -(c.top1 or 0.0),
            -float(c.params), _p90(c))


def published_top1(candidate: Candidate) -> str:
    """The published ImageNet top-1 as the table shows it: only a proxy when the candidate starts pretrained."""
    if candidate.top1 is None:
        return "-"
    return f"{candidate.top1:.1f}%" if candidate.start == "pretrained" else f"({candidate.top1:.1f}%, not its start)"


def format_table(candidates: list[Candidate], budget_ms: float, precisions: tuple[str, ...],
                 chosen: str | None = None) -> str:
    """The selection table: every candidate, its size, each measured form's p50/p90, and whether it fits."""
    header = ["", "candidate", "family", "starts from", "params", "GMACs", "top-1",
              *[f"{p} p50/p90 ms" for p in precisions], "verdict"]
    lines = [header]
    failures: list[str] = []
    for verdict in verdicts(candidates, budget_ms):
        c = verdict.candidate
        forms = {m.precision: m for m in c.measurements}
        cells = [f"{forms[p].p50_ms:.2f} / {forms[p].p90_ms:.2f}" if p in forms and forms[p].stats else
                 "failed" if p in forms else "-" for p in precisions]
        failures += [f"  {c.model_name} {m.precision}: {m.error}" for m in c.measurements if m.error and c.best]
        lines.append(["*" if c.model_name == chosen else "", c.model_name, c.family, c.start,
                      f"{c.params / 1e6:.2f}M" if c.params else "-", f"{c.macs / 1e9:.3f}" if c.macs else "-",
                      published_top1(c), *cells, verdict.note])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in lines)
    return table + ("\nforms that could not be measured (the candidate keeps its other forms):\n" +
                    "\n".join(failures) if failures else "")
