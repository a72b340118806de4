"""Device profiles: what "10 ms" means. One TOML file per target in profiles/, loaded into a frozen DeviceProfile.

A profile is data (runtime, providers, threads, batch, input size policy, precisions, ISA, latency source), so a
new device is a new file, never new code. A latency table written by a probe pack on the device is a profile too:
it embeds the profile it was measured for, and its measurements replace local timing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError

PRECISIONS = ("fp32", "int8_static", "int8_dynamic", "fp16")
ISAS = ("avx2", "avx512", "avx512_vnni", "arm64")
LATENCY_SOURCES = ("host", "probe")  # "table" is set by loading a probe pack's latency table, never written in TOML
RUNTIMES = ("onnxruntime",)
TABLE_FORMAT = "edgekd-latency-table"
PROFILE_DIR_ENV = "EDGEKD_PROFILES"


@dataclass(frozen=True)
class DeviceProfile:
    """A target device and how candidates are deployed and timed on it."""

    name: str
    description: str
    runtime: str
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in priority order
    threads: int  # fixed intra-op threads: timings are only comparable at a fixed count
    batch: int
    input_size: int | None  # side in pixels; None = the teacher's own input size
    precisions: tuple[str, ...]  # deployment forms to measure; the fastest per candidate is kept
    isa: str  # picks the quantization preset
    latency: str  # "host" (timed here), "probe" (timed on the device via a probe pack) or "table" (a probe's result)
    ort_format: bool = False  # the bundle also carries model.ort, for onnxruntime-mobile builds
    source: str = ""  # the file it came from
    table_path: Path | None = None  # for latency == "table": the probe's latency table

    def to_dict(self) -> dict[str, Any]:
        """The TOML fields (what a probe pack embeds and a latency table carries back)."""
        raw = asdict(self)
        for key in ("source", "table_path"):
            raw.pop(key)
        raw["providers"], raw["precisions"] = list(self.providers), list(self.precisions)
        raw["input_size"] = "teacher" if self.input_size is None else self.input_size
        if raw["latency"] == "table":
            raw["latency"] = "probe"
        return raw

    def timing_key(self) -> dict[str, Any]:
        """What makes a measurement on this profile reusable (part of the latency cache key)."""
        return {"name": self.name, "providers": list(self.providers), "threads": self.threads, "batch": self.batch,
                "isa": self.isa}


# ------------------------------------------------------------------------------------------------ discovery

def profile_dirs() -> list[Path]:
    """Where named profiles live: $EDGEKD_PROFILES (os.pathsep-separated), ./profiles, then edgekd's own."""
    dirs = [Path(p) for p in os.environ.get(PROFILE_DIR_ENV, "").split(os.pathsep) if p]
    own = _edgekd_profiles()
    dirs += [Path.cwd() / "profiles", *([own] if own else [])]
    unique: list[Path] = []
    for folder in dirs:
        if folder.is_dir() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def _edgekd_profiles() -> Path | None:
    """edgekd's own profiles: the checkout's profiles/ (a clone, an editable install), or where an installed wheel
    put them (its data files, share/edgekd/profiles under the install scheme's data path, which is sys.prefix in a
    venv but /usr/local, ~/.local or a --prefix elsewhere), found through the installed files' record."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / "profiles"
    try:
        files = importlib.metadata.distribution("edgekd").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if "share/edgekd/profiles/" in file.as_posix() and file.suffix == ".toml":
            return Path(file.locate()).resolve().parent
    return None


def known_profiles() -> dict[str, Path]:
    """Profile name (file stem) -> file; an earlier directory wins."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def list_profiles() -> list[tuple[str, DeviceProfile | EdgekdError]]:
    """Every known profile by the name --profile takes, loaded, or the error that says what is wrong with its file
    (one broken file does not hide the others)."""
    listed: list[tuple[str, DeviceProfile | EdgekdError]] = []
    for name, path in known_profiles().items():
        try:
            listed.append((name, _load_toml(path)))
        except EdgekdError as error:
            listed.append((name, error))
    return listed


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """`--profile`: a known name (host, phone-arm64, ...), a .toml file, or a probe pack's latency table (.json)."""
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.suffix in (".toml", ".json") or path.is_file():
        if not path.is_file():
            raise EdgekdError(f"profile file {path} does not exist; known profiles: {_known_names()}")
        return _load_table(path) if path.suffix == ".json" else _load_toml(path)
    known = known_profiles()
    if text not in known:  # the name a profile gives itself inside its file, as `edgekd profiles` shows it too
        by_field = [path for path in known.values() if _name_field(path) == text]
        if len(by_field) > 1:
            files = ", ".join(map(str, by_field))
            raise EdgekdError(f"profile {text!r} is the name in {len(by_field)} files ({files}); give the file's "
                              "path, or its file name: " + ", ".join(path.stem for path in by_field))
        if by_field:
            return _load_toml(by_field[0])
        raise EdgekdError(f"unknown profile {text!r}; known profiles: {_known_names()} "
                          "(or give a .toml file, or a latency table .json from a probe pack)")
    return _load_toml(known[text])


def _name_field(path: Path) -> str | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
        return None


def _known_names() -> str:
    return ", ".join(known_profiles()) or "none found (add profiles/*.toml)"


def _load_toml(path: Path) -> DeviceProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise EdgekdError(f"profile {path} is not valid TOML: {error}; fix the file") from error
    except OSError as error:
        raise EdgekdError(f"profile {path} cannot be read: {error.strerror}") from error
    return profile_from_dict(raw, source=str(path))


def _load_table(path: Path) -> DeviceProfile:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EdgekdError(f"latency table {path} is not valid JSON: {error}; "
                          "give the file run_probe.py wrote") from error
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT or not isinstance(raw.get("profile"), dict):
        raise EdgekdError(f"{path} is not an edgekd latency table (no \"format\": \"{TABLE_FORMAT}\" with a profile); "
                          "give the latency_table.json that run_probe.py wrote on the device")
    profile = profile_from_dict(raw["profile"], source=str(path))
    return DeviceProfile(**{**asdict(profile), "latency": "table", "table_path": path})


# ------------------------------------------------------------------------------------------------ validation

_REQUIRED = ("name", "providers", "threads", "batch", "input_size", "precisions", "isa", "latency")
_OPTIONAL = ("description", "runtime", "ort_format")
# Providers of onnxruntime's mobile builds, which load the .ort format; profiles using them default to ort_format.
MOBILE_PROVIDERS = ("XnnpackExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider")


def profile_from_dict(raw: dict[str, Any], source: str = "<dict>") -> DeviceProfile:
    """Validate a profile's fields; any missing, unknown or wrong field is an error naming it."""
    where = f"profile {source}"
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise EdgekdError(f"{where}: missing field {missing[0]!r}; every profile needs {', '.join(_REQUIRED)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise EdgekdError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
    runtime = _choice(raw.get("runtime", "onnxruntime"), RUNTIMES, "runtime", where)
    return DeviceProfile(
        name=_text(raw["name"], "name", where), description=str(raw.get("description", "")), runtime=runtime,
        providers=_providers(raw["providers"], where), threads=_threads(raw["threads"], where),
        batch=_positive_int(raw["batch"], "batch", where, upper=1024), input_size=_input_size(raw["input_size"], where),
        precisions=_precisions(raw["precisions"], raw["providers"], where), isa=_isa(raw["isa"], where),
        latency=_choice(raw["latency"], LATENCY_SOURCES, "latency", where),
        ort_format=_ort_format(raw.get("ort_format"), raw["providers"], where), source=source)


def _ort_format(value: Any, providers: Any, where: str) -> bool:
    if value is None:
        return any(provider in MOBILE_PROVIDERS for provider in providers)
    if not isinstance(value, bool):
        raise EdgekdError(f"{where}: field 'ort_format' must be true or false, got {value!r}")
    return value


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EdgekdError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _choice(value: Any, allowed: tuple[str, ...], field: str, where: str) -> str:
    if value not in allowed:
        raise EdgekdError(f"{where}: field {field!r} is {value!r}; use one of {', '.join(allowed)}")
    return str(value)


def _positive_int(value: Any, field: str, where: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise EdgekdError(f"{where}: field {field!r} must be an integer from 1 to {upper}, got {value!r}")
    return value


def _threads(value: Any, where: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(value, str):
        raise EdgekdError(f"{where}: field 'threads' must be an integer or \"auto\", got {value!r}")
    return _positive_int(value, "threads", where, upper=256)


def _input_size(value: Any, where: str) -> int | None:
    if value == "teacher":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 4096:
        raise EdgekdError(f"{where}: field 'input_size' must be \"teacher\" or a side in pixels (8-4096), "
                          f"got {value!r}")
    return value


def _string_list(value: Any, field: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise EdgekdError(f"{where}: field {field!r} must be a non-empty list of strings, got {value!r}")
    return tuple(dict.fromkeys(value))


def _providers(value: Any, where: str) -> tuple[str, ...]:
    providers = _string_list(value, "providers", where)
    bad = [p for p in providers if not p.endswith("ExecutionProvider")]
    if bad:
        raise EdgekdError(f"{where}: field 'providers' has {bad[0]!r}; give ONNX Runtime provider names "
                          "such as CPUExecutionProvider or XnnpackExecutionProvider")
    return providers


# Execution providers with fp16 kernels. ONNX Runtime's CPU provider casts fp16 back to fp32 around most ops: an fp16
# model ran at 0.4-0.97x of fp32's speed on this project's host, so offering it there only adds error.
FP16_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider",
                  "CoreMLExecutionProvider", "NnapiExecutionProvider", "XnnpackExecutionProvider",
                  "QNNExecutionProvider", "WebGpuExecutionProvider", "ROCMExecutionProvider")


def _precisions(value: Any, providers: Any, where: str) -> tuple[str, ...]:
    precisions = _string_list(value, "precisions", where)
    for precision in precisions:
        _choice(precision, PRECISIONS, "precisions", where)
    if "fp16" in precisions and not any(provider in FP16_PROVIDERS for provider in providers or ()):
        raise EdgekdError(f"{where}: precision fp16 needs a provider with fp16 kernels ({', '.join(FP16_PROVIDERS)}); "
                          "the CPU provider runs fp16 slower than fp32: remove fp16 from 'precisions'")
    return precisions


def _isa(value: Any, where: str) -> str:
    return detect_isa() if value == "auto" else _choice(value, ("auto", *ISAS), "isa", where)


def detect_isa() -> str:
    """This CPU's quantization preset: arm64, avx512_vnni (VNNI int8 dot products), else avx2."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"
