"""Probe packs: measure candidates on a device edgekd cannot run on, with nothing but onnxruntime and numpy there.

`write_probe_pack` writes each candidate's deployment-form ONNX files (exported and quantized as they would
ship), pack.json, edgekd's own timing routine (a verbatim copy of edgekd/select/latency.py) and run_probe.py. On the
device, `python run_probe.py` writes latency_table.json, which `--profile latency_table.json` accepts back.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from edgekd.select import latency
from edgekd.artifacts import sha256_file, write_json_atomic, write_text_atomic
from edgekd.select.candidates import (POOL, PoolEntry, TimingConfig, candidate_names, deployment_forms,
                                     resolve_image_size)
from edgekd.errors import EdgekdError
from edgekd.models import preprocess_for
from edgekd.select.profiles import TABLE_FORMAT, DeviceProfile
from edgekd.distill.students import build_student
from edgekd.distill.train_utils import progress

log = logging.getLogger(__name__)

PACK_FORMAT = "edgekd-probe-pack"
RUNNER_NAME = "run_probe.py"
TABLE_NAME = "latency_table.json"
LATENCY_MODULE = "edgekd_latency.py"


def file_stem(model_name: str) -> str:
    """A file-name-safe stem for a candidate name (derived names hold ':' and '=')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)


def write_probe_pack(teacher: str, profile: DeviceProfile, out_dir: Path, *, num_classes: int,
                     image_size: tuple[int, int] | None = None, names: list[str] | None = None,
                     pool: tuple[PoolEntry, ...] = POOL, timing: TimingConfig = TimingConfig()) -> Path:
    """Write the pack for `profile` into `out_dir`; returns the runner's path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "pack.json").exists():
        raise EdgekdError(f"{out_dir} exists and is not a probe pack; give an empty or new folder with --out")
    size = resolve_image_size(teacher, profile, image_size)
    entries, errors = [], []
    candidates = names or candidate_names(teacher, pool)
    # the teacher as the user has it (fp32) too: a relative --budget (4x) divides its p90 on the device
    timed = [(name, profile.precisions) for name in candidates] + \
        ([] if teacher in candidates else [(teacher, ("fp32",))])
    for name, precisions in progress(timed, desc="writing probe pack", unit="model"):
        try:
            model = build_student(name, num_classes, size).eval()
        except EdgekdError as error:
            errors.append({"model_name": name, "error": str(error)})
            continue
        input_size = preprocess_for(model, size).input_size
        forms = deployment_forms(model, input_size, precisions, profile.isa, out_dir / "models", file_stem(name))
        for precision, form in forms.items():
            if isinstance(form, str):
                errors.append({"model_name": name, "precision": precision, "error": form})
                continue
            entries.append({"model_name": name, "precision": precision, "input_shape": list(input_size),
                            "file": str(form.relative_to(out_dir)), "sha256": sha256_file(form)})
    if not entries:
        raise EdgekdError(f"no candidate could be exported for {profile.name}: {errors[0]['error'] if errors else ''}")
    for error in errors:  # the device will not time these: say so now, not when its table comes back without them
        log.warning("not in the pack: %s %s: %s", error["model_name"], error.get("precision", ""), error["error"])
    shutil.copyfile(latency.__file__, out_dir / LATENCY_MODULE)
    write_text_atomic(out_dir / RUNNER_NAME, RUNNER)
    write_text_atomic(out_dir / "requirements.txt", "onnxruntime\nnumpy\n")
    write_text_atomic(out_dir / "README.txt", _readme(profile))
    write_json_atomic(out_dir / "pack.json", {"format": PACK_FORMAT, "version": 1, "teacher": teacher,
                                              "profile": profile.to_dict(), "timing": asdict(timing),
                                              "models": entries, "not_exported": errors})
    return out_dir / RUNNER_NAME


def _readme(profile: DeviceProfile) -> str:
    return (f"edgekd probe pack for profile {profile.name!r}: {profile.description}\n\n"
            "On the device (Python 3.9+):\n"
            "    python -m venv venv && venv/bin/pip install -r requirements.txt   # onnxruntime and numpy only\n"
            f"    venv/bin/python {RUNNER_NAME}                                    # writes {TABLE_NAME}\n\n"
            f"Bring {TABLE_NAME} back and pass it as the profile:\n"
            f"    edgekd select --teacher T --budget 10ms --profile {TABLE_NAME}\n")


# The standalone runner written into every pack. It must stay free of edgekd, torch and timm imports.
RUNNER = '''#!/usr/bin/env python3
"""edgekd probe runner: time this pack's models on this device with edgekd's own timing routine.

Needs only onnxruntime and numpy. Usage: python run_probe.py [--out latency_table.json] [--threads N]
"""

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import onnxruntime as ort  # noqa: E402
from edgekd_latency import measure_onnx  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "TABLE_NAME", help="where to write the latency table")
    parser.add_argument("--threads", type=int, default=None, help="override the profile's thread count")
    args = parser.parse_args()
    pack = json.loads((HERE / "pack.json").read_text())
    profile, timing = dict(pack["profile"]), pack["timing"]
    if args.threads:
        profile["threads"] = args.threads
    missing = [p for p in profile["providers"] if p not in ort.get_available_providers()]
    if missing:
        print("warning: this onnxruntime lacks " + ", ".join(missing) + "; those models run on what it has "
              "(recorded per row)", file=sys.stderr)
    rows = []
    for index, entry in enumerate(pack["models"], 1):
        print("[%d/%d] %s %s" % (index, len(pack["models"]), entry["model_name"], entry["precision"]), flush=True)
        row = {key: entry[key] for key in ("model_name", "precision", "file", "sha256")}
        try:
            stats = measure_onnx(HERE / entry["file"], entry["input_shape"], threads=profile["threads"],
                                 providers=profile["providers"], batch=profile["batch"],
                                 allow_provider_fallback=True, **timing)
            row["stats"] = stats.to_dict()
            print("    p50 %.2f ms, p90 %.2f ms" % (stats.p50_ms, stats.p90_ms), flush=True)
        except Exception as error:  # one model failing must not lose the others' figures
            row["error"] = "%s: %s" % (type(error).__name__, str(error).strip().splitlines()[0][:300])
            print("    failed: " + row["error"], flush=True)
        rows.append(row)
    table = {"format": "TABLE_FORMAT", "version": 1, "teacher": pack.get("teacher"), "profile": profile,
             "device": {"platform": platform.platform(), "machine": platform.machine(),
                        "processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "onnxruntime": ort.__version__,
                        "available_providers": ort.get_available_providers()},
             "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "rows": rows}
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(json.dumps(table, indent=2) + "\\n")
    os.replace(temporary, args.out)
    print("wrote " + str(args.out))


if __name__ == "__main__":
    main()
'''.replace("TABLE_NAME", TABLE_NAME).replace("TABLE_FORMAT", TABLE_FORMAT)
