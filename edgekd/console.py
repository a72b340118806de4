"""The `edgekd` console script. Loading the command line takes seconds (torch, timm, onnxruntime); Ctrl-C while it
loads exits as Ctrl-C does later (code 130, one line), not with a traceback from deep inside an import."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from edgekd.cli import app
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    app()
