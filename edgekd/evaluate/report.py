"""The run's report: report.json (stable keys, see report_schema.json), report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd import __version__
from edgekd.artifacts import write_json_atomic, write_text_atomic
from edgekd.evaluate.bench import BenchResult, ModelFacts
from edgekd.data import LoadedData, readable_count, skipped_images
from edgekd.deploy.bundle import read_shipped_form
from edgekd.metrics import indistinguishable_from_chance

if TYPE_CHECKING:
    from edgekd.select.profiles import DeviceProfile
    from edgekd.select.rule import Selection
    from edgekd.types import StudentCheckpoint, TeacherResult

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


def build_report(*, run_dir: Path, profile: DeviceProfile, data: LoadedData,
                 teachers: list[TeacherResult], selection: Selection, student: StudentCheckpoint, bundle_dir: Path,
                 bench: BenchResult, seconds: float) -> dict[str, Any]:
    """Everything a person or a CI job needs to judge the run, as plain JSON values."""
    teacher = teachers[0]
    teacher_fp32 = _facts(bench, "teacher")
    shipped = _facts(bench, "student")
    fp32_student = _facts(bench, "student-fp32") or (shipped if shipped and shipped.precision == "fp32" else None)
    student_ms, teacher_ms, source = _budget_latencies(bench, profile, selection, shipped, teacher_fp32)
    budget_ms = selection.budget_ms
    summary = {
        "student": student.model_name,
        "precision": shipped.precision if shipped else None,
        "budget_ms": budget_ms,
        "budget_source": selection.budget_source or None,
        "student_p50_ms": student_ms[0],
        "student_p90_ms": student_ms[1],
        "meets_budget": student_ms[1] is not None and student_ms[1] <= budget_ms,
        "teacher_p50_ms": teacher_ms[0],
        "teacher_p90_ms": teacher_ms[1],
        "speedup_vs_teacher": _ratio(teacher_ms[0], student_ms[0]),
        "teacher_top1": teacher_fp32.top1 if teacher_fp32 else None,
        "student_top1": shipped.top1 if shipped else None,
        "student_fp32_top1": fp32_student.top1 if fp32_student else None,
        "accuracy_drop_points": _points(teacher_fp32.top1 if teacher_fp32 else None,
                                        shipped.top1 if shipped else None),
        "teacher_agreement": shipped.teacher_agreement if shipped else None,
        "size_ratio": _ratio(teacher_fp32.size_bytes if teacher_fp32 else None, shipped.size_bytes if shipped else None),
        "measured_threads": profile.threads,
        "latency_source": source,
        "passed_over": [asdict(p) for p in selection.passed_over],
    }
    distill_log = _read_json(Path(student.weights_path).parent / "distill_log.json", [])
    manifest = _read_json(bundle_dir / "manifest.json", [])
    summary["student_init"] = _distill_setup(distill_log).get("student_init")
    summary["shipped_form_reason"] = read_shipped_form(bundle_dir).reason  # the accuracy guard's verdict
    return {
        "schema_version": SCHEMA_VERSION,
        "edgekd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "seconds": round(seconds, 1),
        "summary": summary,
        "profile": profile.to_dict(),
        "data": {"source": data.info.source, "labeled": data.info.labeled, "num_classes": data.info.num_classes,
                 "num_train": data.info.num_train, "num_val": readable_count(data.val),
                 "skipped_corrupt": skipped_images(data), "num_unlabeled": data.info.num_unlabeled},
        "teachers": [{"model": t.model_name, "params": t.params, "input_size": list(t.preprocess.input_size),
                      "weights": t.weights_source, "fine_tuned": t.fine_tuned, "val_top1": t.val_top1,
                      "val_top5": t.val_top5} for t in teachers],
        "selection": _selection(selection),
        "distillation": {"student": student.model_name, "input_size": list(student.preprocess.input_size),
                         "val_top1": student.val_top1, "val_top5": student.val_top5,
                         "teacher_agreement": student.teacher_agreement, "epochs": _epochs(distill_log),
                         **_distill_setup(distill_log)},
        "export": {"bundle_dir": str(bundle_dir), "manifest": manifest},
        "bench": bench.to_dict(),
        "teacher_model": teacher.model_name,
    }


def _budget_latencies(bench: BenchResult, profile: DeviceProfile, selection: Selection, shipped: ModelFacts | None,
                      teacher: ModelFacts | None) -> tuple[tuple[float | None, float | None],
                                                           tuple[float | None, float | None], str]:
    """(student p50, p90), (teacher p50, p90) and where they come from: the profile's own latency source. On `host`
    that is bench's timing here at the profile's threads; on a device profile, the device's latency table (the
    figures selection used). The table holds the candidates only, so the teacher has no device figure there."""
    if profile.latency == "host":
        at = bench.fastest(shipped.name, profile.threads) if shipped else None
        teacher_at = bench.fastest(teacher.name, profile.threads) if teacher else None
        return ((at.p50_ms, at.p90_ms) if at else (None, None),
                (teacher_at.p50_ms, teacher_at.p90_ms) if teacher_at else (None, None),
                f"timed on this machine by bench, {profile.threads} thread(s)")
    measured = selection.chosen.form(shipped.precision) if shipped else None
    return ((measured.p50_ms, measured.p90_ms) if measured else (None, None), (None, None),
            f"the device's latency table ({profile.table_path}); the teacher was not probed on the device, and "
            "bench's figures below are this machine's")


def _selection(selection: Selection) -> dict[str, Any]:
    rows = []
    for verdict in selection.verdicts:
        candidate = verdict.candidate
        best = candidate.best
        rows.append({"model": candidate.model_name, "family": candidate.family, "params": candidate.params,
                     "macs": candidate.macs, "imagenet_top1": candidate.top1, "start": candidate.start,
                     "precision": best.precision if best else None,
                     "p50_ms": _finite(best.p50_ms) if best else None, "p90_ms": _finite(best.p90_ms) if best else None,
                     "fits": verdict.fits, "note": verdict.note,
                     "chosen": candidate.model_name == selection.chosen.model_name})
    return {"chosen": selection.chosen.model_name, "precision": selection.precision, "fits": selection.fits,
            "pinned": selection.pinned, "reason": selection.reason, "rule": selection.rule, "candidates": rows}


NOT_LOSS_TERMS = frozenset({"epoch", "seconds", "images_per_s", "lr", "val_top1", "val_top5", "val_agreement",
                            "teacher_agreement", "step"})


def _distill_setup(log: Any) -> dict[str, Any]:
    """How the student was trained (losses, where and in what precision, how long), from distill_log.json."""
    keys = ("student_init", "losses", "temperature", "augment", "mix", "mix_alpha", "mix_extra", "compute",
            "teacher_compute",
            "compiled", "teacher_cache", "processes", "seconds")
    return {key: log[key] for key in keys if isinstance(log, dict) and key in log}


def distill_line(distillation: dict[str, Any]) -> str | None:
    if "losses" not in distillation:
        return None
    epochs = len(distillation.get("epochs", []))
    temperature = f" at T={distillation['temperature']:g}" if "temperature" in distillation else ""
    mix = distillation.get("mix", "none")
    extra = distillation.get("mix_extra") or 0.0
    added = f" added to each batch ({extra:g} per image)" if extra else ""
    mixing = f", {mix} (alpha {distillation.get('mix_alpha', 1.0):g}){added} on views shared with the teacher" \
        if mix != "none" else ""
    views = ", fixed views (no crop/flip)" if distillation.get("augment") is False else ""
    return (f"Distillation: losses {', '.join(distillation['losses'])}{temperature}{views}{mixing}; student on "
            f"{distillation.get('compute', '?')}, teacher forward on {distillation.get('teacher_compute', '?')}; "
            f"{epochs} epoch(s) in {distillation.get('seconds', 0):.0f} s"
            + (f" on {distillation['processes']} processes" if distillation.get("processes", 1) > 1 else "")
            + (", teacher outputs cached" if distillation.get("teacher_cache") else "") + ".")


def _epochs(log: Any) -> list[dict[str, Any]]:
    """Per-epoch metrics from distill_log.json."""
    history = log.get("epoch_log", []) if isinstance(log, dict) else log
    return [e for e in history if isinstance(e, dict)]


def loss_terms(epochs: list[dict[str, Any]]) -> list[str]:
    """The logged loss names ("loss" is the weighted total), in first-seen order."""
    names = [k for e in epochs for k, v in e.items() if k not in NOT_LOSS_TERMS and isinstance(v, (int, float))]
    return list(dict.fromkeys(names))


REPORT_FILES = ("report.json", "report.md", "report.html")


def write_reports(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """report.json, report.md and report.html, each written whole."""
    paths = {name.split(".")[1]: run_dir / name for name in REPORT_FILES}
    write_json_atomic(paths["json"], report)
    write_text_atomic(paths["md"], render_markdown(report))
    write_text_atomic(paths["html"], render_html(report))
    return paths


# ----------------------------------------------------------------------------------------------- rendering

def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if kind == "mb":
        return f"{value / 1e6:.2f}"
    if kind == "x":
        return f"{value:.1f}x"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_lines(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    verdict = "meets" if s["meets_budget"] else "MISSES"
    teacher_p90 = s.get("teacher_p90_ms")
    teacher_verdict = "" if teacher_p90 is None else \
        f"teacher p90 {_fmt(teacher_p90, 'ms')} ms {'meets' if teacher_p90 <= s['budget_ms'] else 'misses'} it; "
    teacher = report["teachers"][0] if report.get("teachers") else {}
    speed = "the teacher is not timed on this profile" if s.get("teacher_p50_ms") is None else \
        f"teacher p50 {_fmt(s['teacher_p50_ms'], 'ms')} ms: the student's p50 is " \
        f"{_fmt(s['speedup_vs_teacher'], 'x')} faster"
    lines = [
        f"Student: {s['student']} ({s['precision']}), p90 {_fmt(s['student_p90_ms'], 'ms')} ms at "
        f"{s['measured_threads']} thread(s): {verdict} the {_fmt(s['budget_ms'], 'ms')} ms budget "
        f"({s['budget_source'] + '; ' if s.get('budget_source') else ''}{teacher_verdict}{speed}).",
        f"Accuracy: student {_fmt(s['student_top1'], 'pct')} vs teacher {_fmt(s['teacher_top1'], 'pct')} top-1 "
        f"({_fmt(s['accuracy_drop_points'])} points), top-1 agreement with the teacher "
        f"{_fmt(s['teacher_agreement'], 'pct')}; {_fmt(s['size_ratio'], 'x')} smaller file.",
        f"Starting weights: student {s.get('student_init') or 'unknown'}; teacher {teacher.get('weights', '?')}"
        f"{', fine-tuned here' if teacher.get('fine_tuned') else ''}.",
    ]
    data = report.get("data", {})
    if data.get("skipped_corrupt"):
        lines.append(f"Data: {data['skipped_corrupt']} unreadable image(s) skipped (named in the log).")
    if teacher and indistinguishable_from_chance(teacher.get("val_top1"), data.get("num_classes", 0),
                                                 data.get("num_val", 0)):
        lines.append(f"Warning: the teacher's top-1 ({_fmt(teacher['val_top1'], 'pct')} on {data['num_val']} "
                     f"images) is no better than guessing among {data['num_classes']} classes: it had nothing to "
                     "teach; give it more --teacher-epochs or more images.")
    if s.get("shipped_form_reason"):
        lines.append(f"Shipped form: {s['precision']}: {s['shipped_form_reason']}")
    for passed in s.get("passed_over", []):
        lines.append(f"Passed over: {passed['model_name']}: {passed['why']}")
    return lines


def bench_tables(bench: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The model table and the timing table of a BenchResult.to_dict()."""
    models = [(m, m["name"]) for m in bench["models"]]
    model_rows = [[name, m["precision"], _fmt(m["size_bytes"], "mb"), _fmt(m["peak_rss_mb"]),
                   _fmt(m["top1"], "pct"), _fmt(m["top5"], "pct"), _fmt(m["teacher_agreement"], "pct")]
                  for m, name in models]
    timing_rows = [[t["model"], t["provider"].replace("ExecutionProvider", ""), str(t["threads"]),
                    _fmt(t["p50_ms"], "ms"), _fmt(t["p90_ms"], "ms"), _fmt(t["p99_ms"], "ms"),
                    f"{t['throughput_ips']:.0f} @ {t['throughput_batch']}", _fmt(t["session_ms"], "ms")]
                   for t in bench["timings"]]
    return [
        ("Models (size, memory, accuracy)", ["model", "precision", "size MB", "peak RSS MB", "top-1", "top-5",
                                             "agreement with teacher"], model_rows),
        ("Latency (batch 1) and throughput", ["model", "provider", "threads", "p50 ms", "p90 ms", "p99 ms",
                                              "images/s @ batch", "session ms"], timing_rows),
    ]


def _tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    selection = report["selection"]
    candidate_rows = [[("**" + c["model"] + "**") if c["chosen"] else c["model"], c["family"],
                       f"{c['params'] / 1e6:.2f}M", f"{c['macs'] / 1e6:.1f}M", _fmt(c["imagenet_top1"]),
                       c["precision"] or "–", _fmt(c["p50_ms"], "ms"), _fmt(c["p90_ms"], "ms"),
                       {True: "yes", False: "no", None: "–"}[c["fits"]], c["note"]]
                      for c in selection["candidates"]]
    epochs = report["distillation"]["epochs"]
    keys = loss_terms(epochs)
    epoch_rows = [[str(e.get("epoch", i + 1)), *[_fmt(e.get(k)) for k in keys], _fmt(e.get("val_top1"), "pct"),
                   _fmt(e.get("val_agreement", e.get("teacher_agreement")), "pct")] for i, e in enumerate(epochs)]
    return [
        *bench_tables(report["bench"]),
        (f"Candidates measured on profile `{report['profile']['name']}`",
         ["model", "family", "params", "MACs", "ImageNet top-1", "form", "p50 ms", "p90 ms", "fits", "note"],
         candidate_rows),
        ("Distillation", ["epoch", *keys, "val top-1", "agreement"], epoch_rows),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# edgekd report: {report['teacher_model']} -> {report['summary']['student']}", ""]
    lines += [f"- {line}" for line in summary_lines(report)]
    lines += [f"- Selection: {report['selection']['reason']}", f"- Rule: {report['selection']['rule']}",
              f"- Data: {report['data']['source']} ({report['data']['num_train']} train / "
              f"{report['data']['num_val']} val images); bench accuracy on up to "
              f"{max((m['eval_images'] for m in report['bench']['models']), default=0)} validation images.",
              f"- Latency: {report['summary']['latency_source']}; onnxruntime {report['bench']['ort_version']}.",
              *[f"- {line}" for line in [distill_line(report["distillation"])] if line],
              *[f"- Note: {note}" for note in report["bench"]["notes"]], ""]
    for title, header, rows in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines.append(f"Bundle: `{report['export']['bundle_dir']}` (model.onnx, preprocess.json, manifest.json).")
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any]) -> str:
    """One file, no external assets: plots are inline PNGs."""
    parts = [f"<h1>edgekd report: {html.escape(report['teacher_model'])} &rarr; "
             f"{html.escape(report['summary']['student'])}</h1>", "<ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in summary_lines(report)]
    parts += [f"<li>Selection: {html.escape(report['selection']['reason'])}</li>", "</ul>"]
    for title, png in plots(report):
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for title, header, rows in _tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(cell.replace('**', ''))}</td>" for cell in row) + "</tr>"
                  for row in rows]
        parts.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgekd report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def plots(report: dict[str, Any]) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    threads = report["summary"]["measured_threads"]
    budget = report["summary"]["budget_ms"]
    for model in report["bench"]["models"]:
        rows = [t for t in report["bench"]["timings"] if t["model"] == model["name"] and t["threads"] == threads]
        if rows and model["top1"] is not None:
            best = min(rows, key=lambda t: t["p50_ms"])
            marker = "s" if model["role"].startswith("teacher") else "o"
            left.scatter(best["p50_ms"], 100 * model["top1"], s=70, marker=marker, label=model["name"])
    left.axvline(budget, color="red", linestyle="--", label=f"budget {budget:g} ms")
    left.set_xscale("log")
    left.set(xlabel=f"p50 latency, ms (batch 1, {threads} thread(s))", ylabel="top-1 accuracy, %",
             title="Accuracy vs latency")
    left.legend(fontsize=7)
    candidates = [c for c in report["selection"]["candidates"] if c["p90_ms"] is not None]
    candidates.sort(key=lambda c: c["p90_ms"])
    colors = ["tab:blue" if c["chosen"] else ("tab:green" if c["fits"] else "tab:gray") for c in candidates]
    right.barh([f"{c['model']} ({c['precision']})" for c in candidates], [c["p90_ms"] for c in candidates],
               color=colors)
    right.axvline(budget, color="red", linestyle="--")
    right.set_xscale("log")
    right.set(xlabel="measured p90 latency, ms", title="Candidates (blue: chosen, green: fits, gray: too slow)")
    right.tick_params(axis="y", labelsize=7)
    out.append(("Accuracy vs latency, and the candidates against the budget", _png(fig, plt)))

    epochs = report["distillation"]["epochs"]
    keys = loss_terms(epochs)
    if epochs and keys:
        fig, axis = plt.subplots(figsize=(7, 4))
        for key in keys:
            axis.plot([e.get("epoch", i + 1) for i, e in enumerate(epochs)], [e.get(key) for e in epochs],
                      marker="o", label=key)
        axis.set(xlabel="epoch", ylabel="loss", title="Distillation loss terms")
        axis.legend(fontsize=8)
        out.append(("Distillation loss curves", _png(fig, plt)))
    return out


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _facts(bench: BenchResult, role: str) -> ModelFacts | None:
    return next((m for m in bench.models if m.role == role), None)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _points(reference: float | None, value: float | None) -> float | None:
    return None if reference is None or value is None else round(100 * (reference - value), 2)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default
