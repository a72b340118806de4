"""Running the bundle's JavaScript in Node.js from tests: the node binary, and the npm packages `make test` installs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
NODE_MODULES = ROOT / ".node" / "node_modules"  # `make test` installs edgekd/deploy/apps/node/package.json there
SCRIPTS = ROOT / "tests" / "node"
NODE = shutil.which("node")


def app_folder(bundle: Path, into: Path, *scripts: str) -> Path:
    """A copy of `bundle` as an app embeds it: `npm install` there (the packages, linked) and the test `scripts`."""
    if not (NODE_MODULES / "onnxruntime-node").is_dir():
        pytest.fail(f"{NODE_MODULES} has no onnxruntime-node: run `make test`, which installs the npm packages")
    if bundle != into:
        shutil.copytree(bundle, into)
    (into / "node_modules").symlink_to(NODE_MODULES)
    for script in scripts:  # beside node_modules, where Node resolves their imports
        shutil.copyfile(SCRIPTS / script, into / script)
    return into


def node(*args: str | Path) -> list[dict]:
    """Run a script; its stdout is one JSON object per line."""
    done = subprocess.run([NODE, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
