"""`python -m edgekd.cli`: the same command line as `edgekd`."""

from edgekd.cli import app

app()
