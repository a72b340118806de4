"""The accuracy guard: quantize, measure the answers as the target computes them, keep the most sensitive nodes (or
those nearest the input) in float while the form fails, and ship the fastest passing form, or fp32 when int8 does
not pay. Every attempt is a Trial; what shipped and why is a QuantDecision (for the manifest and the log)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from edgekd.deploy import MAX_ACCURACY_DROP
from edgekd.deploy.activation_peaks import extreme_images
from edgekd.deploy.correction_check import kept_corrections
from edgekd.deploy.export import is_transformer
from edgekd.deploy.quantize import (AUTO_CALIBRATION, CALIBRATION_METHODS, COMPUTE_OPS, QuantPreset,
                                    activation_matmuls, prepare_for_quantization, presets_for, quantize_onnx,
                                    squeeze_excite_nodes)
from edgekd.deploy.sensitivity import NodeSensitivity, rank_sensitive_nodes
from edgekd.deploy.verify import (EvalSet, Reference, accuracy_drop, emulates_target, metrics_from_predictions,
                                  onnx_logits)
from edgekd.distill.train_utils import progress
from edgekd.errors import EdgekdError, first_line
from edgekd.select.latency import ORT_RUN_ERRORS

log = logging.getLogger(__name__)

Timing = Callable[[Path, str], "float | None"]  # (model file, its precision) -> p50 ms, None when unknown


@dataclass(frozen=True)
class GuardConfig:
    """When a quantized model is good enough, and how hard to try before giving up on a preset."""

    max_accuracy_drop: float = MAX_ACCURACY_DROP  # points of top-1 (estimated from fp32's probabilities without labels)
    min_agreement: float | None = None  # optional floor (a share, 0-1) on top-1 agreement with the fp32 model
    max_rounds: int = 4  # rounds of "keep the most sensitive nodes in float, quantize again"
    first_exclusion: float = 0.05  # share of quantizable nodes kept in float after round 1; doubles each round
    min_speedup: float = 1.05  # int8 must beat fp32 by this factor (beyond timing noise) to be worth its error
    calibration_method: str = "auto"  # or one of CALIBRATION_METHODS; see AUTO_CALIBRATION

    def float_share(self, round_index: int) -> float:
        """The share of nodes round `round_index` (1, 2, ...) keeps in float: first_exclusion, doubling each round."""
        return self.first_exclusion * 2 ** (round_index - 1)

    def failure(self, drop: float, agreement: float) -> str | None:
        """Why a form that loses `drop` points (verify.accuracy_drop) and agrees with fp32 on `agreement` fails the
        guard, or None when it passes: int8 forms and fp16 are held to the same rule (a NaN drop fails)."""
        if not drop <= self.max_accuracy_drop:
            return f"loses {drop:.2f} points (guard {self.max_accuracy_drop:g})"
        if self.min_agreement is not None and agreement < self.min_agreement:
            return f"agrees with fp32 on {agreement:.1%} of the images (--min-agreement {100 * self.min_agreement:g})"
        return None


@dataclass(frozen=True)
class Trial:
    """One quantization attempt and its figures."""

    precision: str
    preset: QuantPreset
    excluded_nodes: tuple[str, ...]
    top1: float | None
    agreement: float
    accuracy_drop: float  # points
    passed: bool
    latency_ms: float | None = None
    size_bytes: int = 0
    error: str | None = None  # the quantizer could not handle this preset on this graph
    calibration_method: str | None = None  # static presets: how activation ranges were calibrated
    drop_se: float | None = None  # accuracy_drop's sampling error on these images (verify.accuracy_drop)
    images: int = 0  # how many images measured it
    weight_corrections: str | None = None  # static QDQ: the bias correction / learned rounding the file kept
    float_nodes_by: str | None = None  # how its excluded nodes were chosen (FLOAT_NODE_SOURCES); None: none were
    finding: str | None = None  # what the guard found out about why this form failed (the manifest keeps it)
    drop_estimated: bool = False  # the images have no labels: accuracy_drop is estimated (verify.Reference)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preset": self.preset.to_dict(), "excluded_nodes": list(self.excluded_nodes)}

    def describe_drop(self) -> str:
        """"accuracy drop 0.80 +- 0.45 points (1,000 images)": the figure with how precisely it is known, and
        whether it is estimated (images without labels)."""
        spread = f" +- {self.drop_se:.2f}" if self.drop_se is not None else ""
        estimated = ", no labels: estimated from fp32's probabilities" if self.drop_estimated else ""
        return f"accuracy drop {self.accuracy_drop:.2f}{spread} points ({self.images:,} images{estimated})"


@dataclass(frozen=True)
class QuantDecision:
    """What shipped, why, and every attempt that led there (for the manifest and the log)."""

    precision: str  # what was shipped: "fp32" when no int8 form passed the guard and paid
    path: Path
    isa: str
    preset: QuantPreset | None
    fp32_top1: float | None
    fp32_latency_ms: float | None
    latency_ms: float | None
    reason: str
    trials: tuple[Trial, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "path": str(self.path), "isa": self.isa,
                "preset": self.preset.to_dict() if self.preset else None, "fp32_top1": self.fp32_top1,
                "fp32_latency_ms": self.fp32_latency_ms, "latency_ms": self.latency_ms, "reason": self.reason,
                "trials": [t.to_dict() for t in self.trials]}


def search_presets(isa: str, precisions: tuple[str, ...], search: bool, calibration_method: str = "auto",
                   transformer: bool = False) -> tuple[tuple[str, QuantPreset, str], ...]:
    """(precision, preset, calibration method) to try: the ISA's defaults with `calibration_method`, or with
    `search` every preset of the ISA, the static ones with every calibration method."""
    chosen = []
    for precision in precisions:
        mode = precision.removeprefix("int8_")
        presets = presets_for(isa, mode, transformer)
        methods = tuple(CALIBRATION_METHODS) if search and mode == "static" else (calibration_method,)
        chosen += [(precision, p, m) for p in (presets if search else presets[:1]) for m in methods]
    return tuple(chosen)


def guarded_quantize(fp32_path: Path, out_path: Path, *, evalset: EvalSet, calibration: np.ndarray,
                     isa: str = "avx2", precisions: tuple[str, ...] = ("int8_static", "int8_dynamic"),
                     guard: GuardConfig = GuardConfig(), search: bool = False,
                     timing: Timing | None = None, latency_source: str = "timed here",
                     attention_fused: Path | None = None, times_files: bool = True,
                     reference: Reference | None = None) -> QuantDecision:
    """Quantize within the accuracy guard and ship the fastest passing form, or fp32 when int8 does not pay.

    Each (precision, preset) is tried; one whose accuracy drop exceeds the guard keeps its most sensitive nodes
    in float and is quantized again, up to `guard.max_rounds` times. `timing(path, precision) -> p50 ms` ranks the
    passing forms against fp32 (without it the first passing form ships); a form it has no figure for (None: e.g.
    the device's latency table says it failed there) does not ship. `latency_source` says where the figures come
    from, for the reason. Everything tried is in `trials`. `attention_fused` (attention_fusion.py: the same model
    with each block's attention one com.microsoft Attention op) is what dynamic presets quantize when given: it runs
    as QAttention, with the same answers, faster (DeiT-tiny: 2.06x fp32 against 1.84x); a preset that fails on it
    (an error, or the guard) is tried again on the plain graph. `times_files`: `timing` measures the file it is
    given (False for a device's latency table, which has one figure per precision): only then is a static form with
    its input-side nodes in float weighed against the all-int8 one (_input_side_candidate). `reference`: fp32's
    answers on `evalset`, where the caller has them already (None: computed here).
    """
    unknown = [p for p in precisions if p not in ("int8_static", "int8_dynamic")]
    if unknown:
        raise EdgekdError(f"the accuracy guard handles int8_static and int8_dynamic, not {', '.join(unknown)}")
    reference = reference or Reference.of(onnx_logits(fp32_path, evalset.images))
    if len(reference.predictions) != len(evalset.images):
        raise ValueError(f"the reference has {len(reference.predictions)} answers for {len(evalset.images)} images")
    fp32_top1 = metrics_from_predictions(reference.predictions, evalset).top1
    fp32_ms = timing(fp32_path, "fp32") if timing else None
    trials: list[Trial] = []
    best: tuple[Trial, Path] | None = None
    with tempfile.TemporaryDirectory(prefix="edgekd-guard-") as work:
        prepared = prepare_for_quantization(fp32_path, Path(work) / "prepared.onnx", calibration[:8])
        prepared_fused = _prepared_fused(attention_fused, Path(work), calibration) \
            if attention_fused is not None and "int8_dynamic" in precisions else None
        transformer = is_transformer(onnx.load(str(fp32_path), load_external_data=False))
        plan = search_presets(isa, precisions, search, guard.calibration_method, transformer)
        static = any(p.mode == "static" for _, p, _ in plan)
        closer = int(timing is not None and times_files and static)
        bar = TrialProgress(most_trials(plan, guard, fused=prepared_fused is not None,
                                        squeeze_excite=static and bool(squeeze_excite_nodes(prepared))) + closer)
        for index, (precision, preset, method) in enumerate(plan):
            # a dynamic preset quantizes the attention-fused graph first, and the plain one only if that fails
            sources = [(prepared, preset)]
            if prepared_fused is not None and preset.mode == "dynamic":
                sources.insert(0, (prepared_fused, replace(preset, name=f"{preset.name}{FUSED_ATTENTION}")))
            for source, named in sources:
                attempt = Path(work) / f"{index}_{named.name}.onnx"
                try:
                    rounds = _guarded_rounds(source, attempt, precision, named, isa, evalset, calibration,
                                             replace(guard, calibration_method=method), reference,
                                             bar)
                except Exception as error:  # noqa: BLE001 - the fused graph is a faster form, never a new failure
                    if source is prepared:
                        raise
                    log.warning("quantization %s left out: %s", named.name, first_line(error))
                    continue
                final = rounds[-1]
                if final.passed and timing:
                    latency = timing(attempt, precision)
                    final = replace(final, latency_ms=latency) if latency is not None else replace(
                        final, passed=False, error=f"no {precision} latency ({latency_source}): {UNPRICED}")
                    rounds[-1] = final
                trials += rounds
                if final.passed and (best is None or _faster(final, best[0])):
                    best = (final, attempt.rename(Path(work) / f"best_{index}.onnx"))
                if final.passed:
                    break
        if best is not None and timing is not None:
            candidate = _input_side_candidate(best, prepared, Path(work), isa, evalset, calibration, guard,
                                              reference, bar) if closer else None
            fp32_ms, best, timed_candidate = _side_by_side(timing, fp32_path, best, candidate, guard.min_speedup)
            if timed_candidate is not None:
                trials.append(timed_candidate)
        bar.close()
        decision = _decide(best, fp32_top1, fp32_ms, isa, out_path, tuple(trials), guard, latency_source)
        quantize_onnx(best[1] if decision.precision != "fp32" and best else fp32_path, out_path, "fp32")
    log.info("quantization: shipped %s (%s)", decision.precision, decision.reason)
    return decision


def _prepared_fused(attention_fused: Path, work: Path, calibration: np.ndarray) -> Path | None:
    """The attention-fused graph prepared for quantization, or None (dynamic int8 then quantizes the plain one)."""
    try:
        return prepare_for_quantization(attention_fused, work / "prepared.fused.onnx", calibration[:8])
    except Exception as error:  # noqa: BLE001 - quant_pre_process fails in many ways; a faster form, not a must
        log.warning("attention-fused graph left out: %s", first_line(error))
        return None


# A form with the nodes nearest the input in float ships instead of the all-int8 one it is made from when it agrees
# better with fp32 and is at most this much slower (medians of fp32 and both, timed in turn). On the real Lite0, as a
# VNNI/AMX Xeon runs it (int8_float_head.md, 608 held-out photo crops), the stem and first depthwise conv in float
# agree on 95.4% of every crop against 94.4% and on 99.3% of confident ones against 97.8%, KL from fp32 0.0034
# against 0.0053, and run faster (1.90x fp32 against 1.83x): 3-channel and depthwise convs gain little from int8,
# and the tensor between them is the one int8 rounds hardest.
SAME_SPEED = 1.03
NOT_CLOSER = "no closer to fp32 than the all-int8 form: not timed"


def _input_side_candidate(best: tuple[Trial, Path], prepared: Path, work: Path, isa: str, evalset: EvalSet,
                          calibration: np.ndarray, guard: GuardConfig, reference: Reference,
                          tick: Callable[[Trial], None]) -> tuple[Trial, Path] | None:
    """For an all-int8 static `best`, the same form with the guard's first input-side share of compute nodes in
    float (its trial and file), to be timed beside it (_side_by_side); None where there is none or it failed."""
    trial, path = best
    if trial.precision != "int8_static" or trial.excluded_nodes or trial.agreement >= 1.0:  # nothing to gain
        return None
    near_input = input_side_nodes(prepared, trial.preset, guard.float_share(1))
    side = work / f"{path.stem}.input-side.onnx"
    method = trial.calibration_method or guard.calibration_method
    try:
        candidate = _attempt(prepared, side, trial.precision, trial.preset, isa, evalset, calibration,
                             replace(guard, calibration_method=method), near_input, reference,
                             method, 1, "input side")
    except Exception as error:  # noqa: BLE001 - an optional second form: the guard has one to ship already
        log.warning("quantization: the input-side form left out: %s", first_line(error))
        return None
    tick(candidate)
    return candidate, side


def _prefer(incumbent: Trial, candidate: Trial, fp32_ms: float, min_speedup: float) -> bool:
    """Whether `candidate` (input-side nodes in float) ships instead of `incumbent` (all int8), both timed side by
    side: it passed, agrees better with fp32 without losing more top-1, is as fast (SAME_SPEED), and still pays."""
    if not _closer_answers(incumbent, candidate) or candidate.latency_ms is None or incumbent.latency_ms is None:
        return False
    pays = candidate.latency_ms * min_speedup <= fp32_ms or incumbent.latency_ms * min_speedup > fp32_ms
    return candidate.latency_ms <= incumbent.latency_ms * SAME_SPEED and pays


def _closer_answers(incumbent: Trial, candidate: Trial) -> bool:
    """`candidate` passed the guard, agrees better with fp32 and loses no more top-1 than `incumbent`."""
    return (candidate.passed and candidate.agreement > incumbent.agreement
            and candidate.accuracy_drop <= incumbent.accuracy_drop)


class TrialProgress:
    """The guard's progress bar: trials done against the most it may try (it stops at the first form that passes
    the guard unless timings rank several), with rate and ETA (an upper bound), and the last trial's figures."""

    def __init__(self, most: int):
        self.bar = progress(None, total=most, desc="int8 trials (at most)", unit="trial")

    def __call__(self, trial: Trial) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"{trial.preset.name}: {trial.describe_drop()}, agreement {trial.agreement:.1%}",
                                 refresh=False)

    def close(self) -> None:
        self.bar.total = self.bar.n  # finished: the bound was not needed
        self.bar.close()


def most_trials(plan: tuple[tuple[str, QuantPreset, str], ...], guard: GuardConfig, fused: bool = False,
                squeeze_excite: bool = False) -> int:
    """The most trials `plan` can take: round 0 (each "auto" calibration method for a static preset), then per
    round the ranked nodes in float and the input-side nodes in float, and once the squeeze-excite branches (a
    static preset, where the graph has them); a dynamic preset twice with an attention-fused graph (it, then the
    plain one)."""
    return sum(((len(AUTO_CALIBRATION) if method == "auto" and preset.mode == "static" else 1) + 2 * guard.max_rounds
                + (squeeze_excite and preset.mode == "static" and guard.max_rounds > 0))
               * (2 if fused and preset.mode == "dynamic" else 1) for _, preset, method in plan)


FUSED_ATTENTION = "_attention_fused"  # a dynamic preset's name, quantized from the attention-fused graph

UNPRICED = "it cannot be shown to pay"  # a form the guard passed, with no latency to rank it by

# The decision times fp32 and the fastest passing int8 form alternately, this many rounds, and compares medians:
# p50s taken minutes apart on a busy machine drift by more than the 5% int8 must gain (a classifier-only dynamic
# int8, no faster by construction, once measured 1.11x that way: benchmarks/results/quantization_host.md).
SIDE_BY_SIDE_ROUNDS = 3


def _side_by_side(timing: Timing, fp32_path: Path, best: tuple[Trial, Path],
                  candidate: tuple[Trial, Path] | None, min_speedup: float
                  ) -> tuple[float | None, tuple[Trial, Path], Trial | None]:
    """fp32, the fastest passing form and (when given) its input-side candidate timed in turn, SIDE_BY_SIDE_ROUNDS
    rounds: (fp32's median, the form to ship with its median, the candidate's trial with its median)."""
    # the candidate is timed only if it can win on its answers (_prefer): each timing takes seconds
    closer = candidate is not None and _closer_answers(best[0], candidate[0])
    contenders = [best] + ([candidate] if closer else [])
    if candidate is not None and candidate[0].passed and not closer:  # within the guard, but it cannot ship
        candidate = (replace(candidate[0], passed=False, error=NOT_CLOSER), candidate[1])
    fp32_times: list[float] = []
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(SIDE_BY_SIDE_ROUNDS):
        fp32_ms = timing(fp32_path, "fp32")
        measured = [timing(path, trial.precision) for trial, path in contenders]
        if fp32_ms is None or any(ms is None for ms in measured):
            return fp32_ms, best, candidate[0] if candidate else None
        fp32_times.append(fp32_ms)
        for ms, kept in zip(measured, times):
            kept.append(ms)
    fp32_median = float(np.median(fp32_times))
    timed = [(replace(trial, latency_ms=float(np.median(ms))), path) for (trial, path), ms in zip(contenders, times)]
    if len(timed) == 1:
        return fp32_median, timed[0], candidate[0] if candidate else None
    (incumbent, incumbent_path), (challenger, challenger_path) = timed
    if _prefer(incumbent, challenger, fp32_median, min_speedup):
        log.info("quantization: %d node(s) nearest the input in float agree with fp32 on %.1f%% against %.1f%%, "
                 "%.2f ms against %.2f", len(challenger.excluded_nodes), 100 * challenger.agreement,
                 100 * incumbent.agreement, challenger.latency_ms, incumbent.latency_ms)
        return fp32_median, (challenger, challenger_path), challenger
    return fp32_median, (incumbent, incumbent_path), challenger


def _faster(candidate: Trial, incumbent: Trial) -> bool:
    if candidate.latency_ms is None or incumbent.latency_ms is None:
        return False
    return candidate.latency_ms < incumbent.latency_ms


def _decide(best: tuple[Trial, Path] | None, fp32_top1: float | None, fp32_ms: float | None, isa: str,
            out_path: Path, trials: tuple[Trial, ...], guard: GuardConfig, latency_source: str) -> QuantDecision:
    min_speedup = guard.min_speedup
    if best is None:
        unpriced = next((t for t in trials if t.error and t.error.endswith(UNPRICED)), None)
        if unpriced is not None:  # accurate enough, but the latency source has no figure for it
            return QuantDecision("fp32", out_path, isa, None, fp32_top1, fp32_ms, fp32_ms, trials=trials,
                                 reason=f"{unpriced.preset.name} stayed within the accuracy guard, but "
                                        f"{unpriced.error}; measure it there (a probe pack with this student)")
        floor = "" if guard.min_agreement is None else \
            f" and agreed with fp32 on at least {100 * guard.min_agreement:g}% of the images (--min-agreement)"
        return QuantDecision("fp32", out_path, isa, None, fp32_top1, fp32_ms, fp32_ms, trials=trials,
                             reason=f"no int8 form stayed within the accuracy guard{floor}")
    trial = best[0]
    if fp32_ms is not None and trial.latency_ms is not None and trial.latency_ms * min_speedup > fp32_ms:
        return QuantDecision("fp32", out_path, isa, None, fp32_top1, fp32_ms, fp32_ms, trials=trials,
                             reason=f"fastest int8 ({trial.preset.name}, {trial.latency_ms:.2f} ms) is no faster "
                                    f"than fp32 ({fp32_ms:.2f} ms) by the {min_speedup:g}x it must gain "
                                    f"({latency_source})")
    speed = f", {fp32_ms / trial.latency_ms:.2f}x faster than fp32 ({latency_source})" \
        if fp32_ms and trial.latency_ms else ""
    calibrated = f", {trial.calibration_method} calibration" if trial.calibration_method else ""
    if trial.weight_corrections:  # what the file kept of bias correction and learned rounding (correction_check)
        calibrated += f", weight corrections: {trial.weight_corrections}"
    if trial.excluded_nodes:
        calibrated += f", {len(trial.excluded_nodes)} node(s) in float ({trial.float_nodes_by})"
    return QuantDecision(trial.precision, out_path, isa, trial.preset, fp32_top1, fp32_ms, trial.latency_ms,
                         trials=trials, reason=f"{trial.preset.name}{calibrated}: {trial.describe_drop()}, "
                                                f"agreement {trial.agreement:.1%}{speed}")


def _guarded_rounds(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str, evalset: EvalSet,
                    calibration: np.ndarray, guard: GuardConfig, reference: Reference,
                    tick: Callable[[Trial], None]) -> list[Trial]:
    """Quantize, measure, and while the guard fails keep the most sensitive nodes in float and try again; a round
    whose ranked nodes fail also tries that share of the compute nodes nearest the input, and round 1 then the
    squeeze-excite branches ("auto" calibration first tries each method of AUTO_CALIBRATION, then goes on with the
    one that lost least)."""
    excluded: tuple[str, ...] = ()
    rounds: list[Trial] = []
    tried: set[tuple[str, ...]] = set()  # input-side sets already measured (a small graph's share repeats)
    method = guard.calibration_method if preset.mode == "static" else None
    if method == "auto":
        method, first = _first_calibration(prepared, target, precision, preset, isa, evalset, calibration, guard,
                                           reference, tick)
        rounds += first
        if first[-1].passed or first[-1].error:
            return rounds
        guard = replace(guard, calibration_method=method)
    for round_index in range(1 if rounds else 0, guard.max_rounds + 1):
        ranked_more = round_index == 0
        if round_index > 0:  # the last round failed: keep more of its most sensitive nodes in float
            more = _more_in_float(prepared, target, precision, preset, isa, calibration, guard, evalset, excluded,
                                  round_index)
            ranked_more, excluded = more != excluded, more
        if ranked_more:
            trial = _attempt(prepared, target, precision, preset, isa, evalset, calibration, guard, excluded,
                             reference, method, round_index, "sensitivity" if round_index else None)
            rounds.append(trial)
            tick(trial)
            if trial.passed or trial.error:
                break
        near_input = input_side_nodes(prepared, preset, guard.float_share(round_index)) if round_index > 0 else ()
        if near_input and near_input not in tried:  # nor did the ranked nodes: the compute nodes nearest the input
            tried.add(near_input)
            if _in_float_beside(prepared, target, precision, preset, isa, evalset, calibration, guard, near_input,
                                reference, method, round_index, "input side", rounds, tick):
                break
            # once, in round 1: the squeeze-excite branches (quantize.squeeze_excite_nodes), which the ranking misses:
            # the 2-epoch MobileNetV3-large student of quantization_host.md lost 2.32 points as static int8 and 0.15
            # with its 40 squeeze-excite nodes in float (its guard trials are recorded there)
            branches = squeeze_excite_nodes(prepared) if round_index == 1 and preset.mode == "static" else ()
            if branches and _in_float_beside(prepared, target, precision, preset, isa, evalset, calibration, guard,
                                             branches, reference, method, round_index,
                                             "squeeze-excite", rounds, tick):
                break
        elif not ranked_more:
            break  # neither way has another node to keep in float
    return rounds


def _in_float_beside(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str, evalset: EvalSet,
                     calibration: np.ndarray, guard: GuardConfig, nodes: tuple[str, ...],
                     reference: Reference, method: str | None, round_index: int,
                     chosen_by: str, rounds: list[Trial], tick: Callable[[Trial], None]) -> bool:
    """A trial with `nodes` (chosen another way than by rank) in float, written beside `target` so that a failure
    leaves the ranked form there for the next round; appended to `rounds`. True if it passed (then it is `target`)."""
    side = target.with_name(f"{target.stem}.{chosen_by.replace(' ', '-')}.onnx")
    trial = _attempt(prepared, side, precision, preset, isa, evalset, calibration, guard, nodes, reference,
                     method, round_index, chosen_by)
    rounds.append(trial)
    tick(trial)
    if trial.passed:
        side.replace(target)
        return True
    side.unlink(missing_ok=True)
    return False


# The ranking scores each tensor by the error its own quantization adds, and an early tensor's error is small where it
# is made and grows through every layer after it: on the real Lite0 (152 photo crops, asked for 97% agreement)
# four rounds of ranked nodes, up to 38 in float, left agreement at 96.1-96.7%, where the stem and the first
# depthwise conv in float alone give 97.4% (int8_rounding.md). So a round whose ranked nodes fail also tries the
# compute nodes nearest the input, as large a share (5%, 10%, ... of them). What those two keep is the tensor between
# them: the stem alone in float gives 94.1%, the depthwise conv alone 94.1%, the next pointwise conv alone 94.1%, both
# 97.4% (none 95.4%; int8_rounding.md, as a VNNI CPU computes it). That tensor's live channels peak within a factor of
# 1.35 of each other (18 of 32 at ReLU6's cap, 4 never active), so rescaling channels into the depthwise conv
# (cross-layer equalization) has little to even out (a probe of it, 2026-12-06, not committed: the same 95.4%).
FLOAT_NODE_SOURCES = ("sensitivity", "input side", "squeeze-excite")


def _attempt(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str, evalset: EvalSet,
             calibration: np.ndarray, guard: GuardConfig, excluded: tuple[str, ...], reference: Reference,
             method: str | None, round_index: int, chosen_by: str | None) -> Trial:
    """Quantize with `excluded` in float and measure it: one trial (with `error` set where it could not be done)."""
    def failed(message: str) -> Trial:
        log.info("quantization %s: %s", preset.name, message)
        return Trial(precision, preset, excluded, None, 0.0, 100.0, False, error=message, calibration_method=method,
                     float_nodes_by=chosen_by)

    try:
        quantize_onnx(prepared, target, precision, isa=isa, calibration=calibration, preset=preset,
                      prepared=True, calibration_method=guard.calibration_method, nodes_to_exclude=excluded)
    except EdgekdError as error:
        return failed(str(error))
    try:
        trial = _measure(target, precision, preset, isa, excluded, evalset, reference, guard)
    except ORT_RUN_ERRORS as error:
        return failed(f"{precision} does not run: {first_line(error, 160)}")
    trial = replace(trial, calibration_method=method, float_nodes_by=chosen_by)
    log.info("quantization %s round %d: %d node(s) in float%s, %s, agreement %.1f%% -> %s", preset.name, round_index,
             len(excluded), f" ({chosen_by})" if chosen_by else "", trial.describe_drop(), 100 * trial.agreement,
             "pass" if trial.passed else "fail")
    return trial


def input_side_nodes(prepared: Path, preset: QuantPreset, share: float) -> tuple[str, ...]:
    """The first `share` of the compute nodes the preset quantizes (at least one), in graph (topological) order: the
    guard's round r asks for GuardConfig.float_share(r) of them."""
    ops = set(preset.op_types or COMPUTE_OPS) & set(COMPUTE_OPS)
    left_float = set(activation_matmuls(prepared)) if preset.weight_matmuls_only else set()  # float anyway
    compute = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ops and n.name not in left_float]
    return tuple(compute[:max(1, round(len(compute) * share))])


def _more_in_float(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str,
                   calibration: np.ndarray, guard: GuardConfig, evalset: EvalSet, excluded: tuple[str, ...],
                   round_index: int) -> tuple[str, ...]:
    """`excluded` plus the most sensitive nodes of the failed model at `target`: 5% of the ranked nodes for round 1,
    doubling each round, and the rest of the last tensor's nodes (its producer and readers): a tensor any quantized
    node reads is still quantized."""
    ranked = [s for s in _rank(prepared, target, precision, preset, isa, calibration, guard, excluded,
                               evalset.images[:SENSITIVITY_IMAGES]) if s.added_error > 0]
    count = max(1, round(len(ranked) * guard.float_share(round_index)))
    while 0 < count < len(ranked) and ranked[count].tensor == ranked[count - 1].tensor:
        count += 1
    if ranked:
        log.info("keeping in float: %s", ", ".join(f"{s.name} ({s.added_error:.2g})" for s in ranked[:count]))
    return excluded + tuple(s.name for s in ranked[:count])


def _first_calibration(prepared: Path, target: Path, precision: str, preset: QuantPreset, isa: str,
                       evalset: EvalSet, calibration: np.ndarray, guard: GuardConfig, reference: Reference,
                       tick: Callable[[Trial], None]) -> tuple[str, list[Trial]]:
    """Round 0 of "auto" calibration: each method of AUTO_CALIBRATION in turn until one passes. Returns the method
    to go on with (the one that passed, else the one that lost least, its model left at `target`) and the trials."""
    trials: list[Trial] = []
    best: tuple[float, str] | None = None
    for method in AUTO_CALIBRATION:
        trial = _guarded_rounds(prepared, target, precision, preset, isa, evalset, calibration,
                                replace(guard, calibration_method=method, max_rounds=0), reference,
                                tick)[0]
        if trial.passed or trial.error:
            return method, [*trials, trial]
        if method == "minmax":  # say why the next ranges may do better: a few images can stretch minmax's
            stretching = extreme_images(prepared, calibration)
            if stretching.extreme:
                log.info("minmax ranges: %s; averaged ranges clip them", stretching.describe())
                trial = replace(trial, finding=f"ranges stretched: {stretching.describe()}")
        trials.append(trial)
        if best is None or trial.accuracy_drop < best[0]:
            best = (trial.accuracy_drop, method)
    assert best is not None
    if best[1] != AUTO_CALIBRATION[-1]:  # leave the best method's model at `target`, where sensitivity ranks it
        quantize_onnx(prepared, target, precision, isa=isa, calibration=calibration, preset=preset, prepared=True,
                      calibration_method=best[1])
    return best[1], trials


def _rank(prepared: Path, quantized: Path, precision: str, preset: QuantPreset, isa: str, calibration: np.ndarray,
          guard: GuardConfig, excluded: tuple[str, ...], images: np.ndarray) -> list[NodeSensitivity]:
    """Sensitivity of each node, from a QDQ model (qdq_loss_debug pairs its dequantized tensors with fp32's by name):
    a static QOperator model is ranked through its QDQ twin (same scales); a dynamic one, which computes its
    activation ranges at run time, through a statically calibrated QDQ model of the same op types."""
    if preset.quant_format != "qdq" or preset.mode == "dynamic":
        quantized = quantized.with_name(quantized.stem + ".qdq.onnx")
        twin = replace(preset, quant_format="qdq", mode="static")
        quantize_onnx(prepared, quantized, "int8_static", isa=isa, calibration=calibration, prepared=True,
                      preset=twin, calibration_method=guard.calibration_method, nodes_to_exclude=excluded)
    ranked = rank_sensitive_nodes(prepared, quantized, images, skip=excluded)
    return [s for s in ranked if not preset.op_types or s.op_type in preset.op_types]  # only what it quantized


SENSITIVITY_IMAGES = 32  # enough to rank nodes by the error they add; the guard itself uses the whole set


def _measure(path: Path, precision: str, preset: QuantPreset, isa: str, excluded: tuple[str, ...],
             evalset: EvalSet, reference: Reference, guard: GuardConfig) -> Trial:
    """The trial's figures as the target's CPU computes them (verify.emulates_target: a file for another kind of CPU
    than this one is measured in float, not in this CPU's int8 kernels)."""
    if emulates_target(path, isa):
        log.info("measuring %s as %s computes it: this CPU's int8 kernels are another kind", path.name, isa)
    predictions = onnx_logits(path, evalset.images, target_isa=isa).argmax(axis=1)
    metrics = metrics_from_predictions(predictions, evalset, reference=reference.predictions)
    agreement = metrics.agreement if metrics.agreement is not None else 0.0
    drop = accuracy_drop(reference, predictions, evalset.labels)
    passed = guard.failure(drop.points, agreement) is None
    return Trial(precision, preset, excluded, metrics.top1, agreement, drop.points, passed,
                 size_bytes=path.stat().st_size, drop_se=drop.standard_error, images=drop.images,
                 weight_corrections=kept_corrections(path), drop_estimated=drop.estimated)
