"""The `edgekd` command line: thin typer wrappers that parse options and call plain functions.

app.py holds the typer application and what every command shares; options.py the options several commands take;
one module per command (or per family of commands) registers it on the app when imported here.
"""

from edgekd.cli import bench, compress, distill, export, select, teacher  # noqa: F401  (registers the commands)
from edgekd.cli.app import app

__all__ = ["app"]
