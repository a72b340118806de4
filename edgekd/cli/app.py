"""The typer application, and what every command shares: logging, one-line errors, Ctrl-C / SIGTERM as interrupts."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator

import typer

from edgekd import __version__
from edgekd.errors import EdgekdError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a big timm image model into a small ONNX model that fits a latency budget.")

log = logging.getLogger("edgekd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="edgekd: %(message)s",
                        stream=sys.stderr, force=True)


PATH_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# Where the run writes cannot take it: said with the file that failed, and what to do.
DISK_ERRORS = {errno.ENOSPC: "free space on that disk, or {elsewhere}, and run the command again",
               errno.EDQUOT: "free space within your quota, or {elsewhere}, and run the command again",
               errno.EFBIG: "the file system or a limit (ulimit -f) caps file sizes; {elsewhere}",
               errno.EROFS: "{elsewhere}"}


WORK_DIR_PREFIX = "edgekd-"  # edgekd's scratch folders in TMPDIR (tempfile.TemporaryDirectory(prefix="edgekd-..."))


def _elsewhere(filename: str | None) -> str:
    """How to put the file that failed on another disk: most are under --out; work files and caches are not."""
    import tempfile

    from edgekd.distill.state import TEACHER_CACHE_ENV, teacher_cache_root

    def under(folder) -> bool:
        return bool(filename) and os.path.commonpath([os.path.abspath(filename), os.path.abspath(folder)]) == \
            os.path.abspath(folder)

    if under(teacher_cache_root()):
        return f"set {TEACHER_CACHE_ENV} to a folder on another disk"
    if under(tempfile.gettempdir()) and os.path.relpath(os.path.abspath(filename), tempfile.gettempdir()).startswith(
            WORK_DIR_PREFIX):  # export's and quantization's scratch folders
        return "set TMPDIR to a folder on another disk"
    return "pass --out (or run from) a folder on another disk"


RESUME = "finished stages are kept; run the same command again to resume"


def user_errors(func: Callable | None = None, *, resume: str = RESUME) -> Callable:
    """User mistakes become one line on stderr and exit code 2; an interrupt (Ctrl-C or SIGTERM) says how to resume
    (`resume`: a command whose re-run does not resume by itself says what does). `@user_errors` or
    `@user_errors(resume=...)`."""
    if func is None:
        return functools.partial(user_errors, resume=resume)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt(), _progress_bars_closed_on_the_way_out():
                return func(*args, **kwargs)
        except EdgekdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except PATH_ERRORS as error:  # a path given where a folder or file cannot be (--out on a file, ...)
            typer.echo(f"error: {error.strerror}: {error.filename}; check the paths given (--out, --data, ...)",
                       err=True)
            raise typer.Exit(2) from None
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            where = f": {error.filename}" if error.filename else ""
            advice = DISK_ERRORS[error.errno].format(elsewhere=_elsewhere(error.filename))
            typer.echo(f"error: {error.strerror}{where}; {advice}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo(f"interrupted: {resume}", err=True)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def _progress_bars_closed_on_the_way_out():
    """A failure or an interrupt ends the bars it cut short first: otherwise tqdm redraws them at exit, after the
    one-line message, which then is no longer the last line."""
    from tqdm import tqdm

    try:
        yield
    except BaseException:
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`kill`, torchrun and job schedulers stop a run with SIGTERM: handle it like Ctrl-C, so distillation writes
    its checkpoint (mid-epoch) before the process ends and `--resume` / a re-run continues from there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
