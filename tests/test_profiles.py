"""Device profiles: the shipped TOML files load, and a bad profile names the field that is wrong."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.select.profiles import ISAS, PRECISIONS, known_profiles, load_profile, profile_from_dict

GOOD = """
name = "tiny"
providers = ["CPUExecutionProvider"]
threads = 1
batch = 1
input_size = 32
precisions = ["fp32", "int8_dynamic"]
isa = "avx2"
latency = "host"
"""


def write(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_profiles_load_and_cover_the_targets():
    names = set(known_profiles())
    assert {"host", "desktop-avx2", "phone-arm64", "rpi4"} <= names
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.threads >= 1 and profile.batch >= 1
        assert set(profile.precisions) <= set(PRECISIONS) and profile.isa in ISAS
    host = load_profile("host")
    assert host.latency == "host" and host.input_size is None
    phone = load_profile("phone-arm64")
    assert phone.isa == "arm64" and phone.providers[0] == "XnnpackExecutionProvider" and phone.latency == "probe"
    assert phone.ort_format and not host.ort_format  # onnxruntime-mobile loads model.ort


def test_profile_file_by_path(tmp_path):
    profile = load_profile(str(write(tmp_path, GOOD)))
    assert (profile.name, profile.threads, profile.input_size, profile.precisions) == \
        ("tiny", 1, 32, ("fp32", "int8_dynamic"))
    assert profile_from_dict(profile.to_dict()) == profile.__class__(**{**profile.__dict__, "source": "<dict>"})


def test_ort_format_follows_mobile_providers_unless_the_profile_says(tmp_path):
    xnnpack = GOOD.replace('["CPUExecutionProvider"]', '["XnnpackExecutionProvider", "CPUExecutionProvider"]')
    assert load_profile(str(write(tmp_path, xnnpack))).ort_format
    assert not load_profile(str(write(tmp_path, xnnpack + "ort_format = false\n"))).ort_format
    assert load_profile(str(write(tmp_path, GOOD + "ort_format = true\n"))).ort_format
    assert not load_profile(str(write(tmp_path, GOOD))).ort_format


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(EdgekdError, match=r"unknown profile 'pixel9'.*host.*phone-arm64"):
        load_profile("pixel9")


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("threads = 1\n", ""), "threads"),
    (lambda t: t.replace("threads = 1", 'threads = "many"'), "threads"),
    (lambda t: t.replace("batch = 1", "batch = 0"), "batch"),
    (lambda t: t.replace('"int8_dynamic"', '"int4"'), "precisions"),
    (lambda t: t.replace('isa = "avx2"', 'isa = "sse2"'), "isa"),
    (lambda t: t.replace('latency = "host"', 'latency = "guess"'), "latency"),
    (lambda t: t.replace("input_size = 32", 'input_size = "big"'), "input_size"),
    (lambda t: t.replace('["CPUExecutionProvider"]', '["CPU"]'), "providers"),
    (lambda t: t + 'thread_count = 4\n', "thread_count"),
    (lambda t: t + 'ort_format = "yes"\n', "ort_format"),
])
def test_bad_field_is_named(tmp_path, edit, field):
    with pytest.raises(EdgekdError, match=f"'{field}'"):
        load_profile(str(write(tmp_path, edit(GOOD))))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(EdgekdError, match="not valid TOML"):
        load_profile(str(write(tmp_path, "name = [unclosed\n")))
    with pytest.raises(EdgekdError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))


def test_a_json_that_is_not_a_latency_table_is_refused(tmp_path):
    with pytest.raises(EdgekdError, match="not an edgekd latency table"):
        load_profile(str(write(tmp_path, '{"rows": []}', "table.json")))


def test_profiles_from_the_environment_are_listed(tmp_path, monkeypatch):
    write(tmp_path, GOOD, "tiny.toml")
    monkeypatch.setenv("EDGEKD_PROFILES", str(tmp_path))
    assert load_profile("tiny").source == str(tmp_path / "tiny.toml")
    # a file whose name field differs from its file name answers to both; a broken file is named, not in the way
    write(tmp_path, GOOD.replace('name = "tiny"', 'name = "my-laptop"'), "laptop.toml")
    write(tmp_path, "threads = [", "broken.toml")
    assert load_profile("my-laptop").source == load_profile("laptop").source == str(tmp_path / "laptop.toml")
    listed = CliRunner().invoke(app, ["profiles"])
    assert listed.exit_code == 2 and "also --profile my-laptop" in listed.output, listed.output
    assert "broken         cannot be used: profile" in listed.output and "host" in listed.output
    write(tmp_path, GOOD.replace('name = "tiny"', 'name = "my-laptop"'), "other.toml")  # two files, one name
    with pytest.raises(EdgekdError, match="is the name in 2 files"):
        load_profile("my-laptop")
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"'.encode("latin-1"))  # not UTF-8: named, not a traceback
    assert "latin1         cannot be used: profile" in CliRunner().invoke(app, ["profiles"]).output


def test_cli_profiles_and_unknown_profile():
    runner = CliRunner()
    listed = runner.invoke(app, ["profiles"])
    assert listed.exit_code == 0 and "phone-arm64" in listed.output and "rpi4" in listed.output
    bad = runner.invoke(app, ["select", "--teacher", "test_vit", "--budget", "10ms", "--profile", "nope"])
    assert bad.exit_code == 2 and "known profiles" in bad.output


def test_fp16_is_offered_only_with_a_provider_that_has_fp16_kernels():
    base = {"name": "t", "threads": 1, "batch": 1, "input_size": 32, "isa": "avx2", "latency": "host"}
    with pytest.raises(EdgekdError, match="fp16 needs a provider with fp16 kernels"):
        profile_from_dict({**base, "providers": ["CPUExecutionProvider"], "precisions": ["fp32", "fp16"]})
    gpu = profile_from_dict({**base, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                             "precisions": ["fp32", "fp16"]})
    assert "fp16" in gpu.precisions


def _installed_edgekd() -> list[str]:
    """The folders this environment's edgekd distributions are installed in (an editable install's too)."""
    import importlib.metadata

    return sorted(str(d.locate_file("")) for d in importlib.metadata.distributions() if d.metadata["Name"] == "edgekd")


def test_an_installed_edgekd_finds_its_profiles_outside_the_checkout(tmp_path):
    """`pip install edgekd` (a wheel, not this checkout): `--profile host` must still be found. The wheel carries
    profiles/ as data files, which land under the install scheme's data path: sys.prefix in a venv, but /usr/local
    for Debian's system Python, ~/.local with --user, or a --prefix. Installed into a fresh venv and under a --prefix,
    each borrowing this environment's libraries (torch, timm, ...) but not its editable edgekd, and run from a folder
    without profiles/."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    installed_before = _installed_edgekd()
    root, source = Path(__file__).resolve().parents[1], tmp_path / "source"
    source.mkdir()  # built from a copy: setuptools leaves build/ in the tree it builds
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for folder in ("edgekd", "profiles"):
        shutil.copytree(root / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    wheel = str(next((tmp_path / "wheel").glob("edgekd-*.whl")))
    borrowed = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKD_PROFILES", "PYTHONPATH")}
    probe = ("import edgekd.select.profiles as p; print(p.__file__); "
             "print(p.load_profile('host').name, sorted(p.known_profiles()))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], check=True,
                   capture_output=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # a plain path line: this environment's libraries after the installed edgekd (no .pth of theirs is read, so the
    # editable edgekd stays out)
    Path(site, "borrowed.pth").write_text(borrowed + "\n")
    prefix = tmp_path / "prefix"
    # --ignore-installed: pip would otherwise uninstall this environment's own edgekd (the developer's editable
    # install) before writing the wheel under the prefix
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--ignore-installed", "--prefix",
                    str(prefix), wheel], check=True, capture_output=True)
    prefixed = next(prefix.glob("lib/python*/site-packages"))
    for command, installed in (([python, "-c", probe], site),
                               ([python, "-S", "-c", f"import sys; sys.path[:0] = [{str(prefixed)!r}, {borrowed!r}]; "
                                 + probe], str(prefixed))):
        shown = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, env=env)
        assert shown.returncode == 0, shown.stderr[-2000:]
        module, profiles = shown.stdout.splitlines()
        assert module.startswith(installed)  # the installed copy, not this checkout
        assert profiles == "host ['desktop-avx2', 'host', 'phone-arm64', 'rpi4']"
    # and this environment's own edgekd, if it had one, is still installed (make test must not uninstall the
    # editable install that make demo and the benchmarks run)
    assert _installed_edgekd() == installed_before
