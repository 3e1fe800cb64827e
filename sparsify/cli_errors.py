"""How the command line ends a command: one line per error (a traceback only under --debug or
SPARSIFY_DEBUG=1, or for a bug), results on stdout and remarks on stderr from rank 0 only."""

from __future__ import annotations

import sys
from functools import wraps

import click
import typer

from sparsify.console import reader_gone, stop_writing_to, write_line
from sparsify.errors import SparsifyError


def fail(message: str, code: int) -> None:
    try:
        typer.secho(f"error: {message}" if code == 1 else message, err=True, fg="red" if code == 1 else "yellow")
    except OSError:  # nobody reads stderr any more (or it is a full disk): the exit code still tells
        stop_writing_to(sys.stderr)
    raise typer.Exit(code)


DEBUG_ENV = "SPARSIFY_DEBUG"


def debugging() -> bool:
    """True under --debug or SPARSIFY_DEBUG=1: unexpected exceptions keep their traceback."""
    import os

    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def reports_errors(func):
    """Turn SparsifyError into one line on stderr and its exit code (no traceback); any other
    exception into one line saying it is a bug, or where in the user's own code it was raised (its
    traceback under --debug or SPARSIFY_DEBUG=1)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SparsifyError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            typer.secho("interrupted; finished stages are kept, rerun the command to continue", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and reader_went_away():  # as when killed by SIGPIPE: 128 + 13
                raise typer.Exit(141) from None
            if debugging():
                raise
            fail(unexpected_line(exc), 1)

    return wrapper


def reader_went_away() -> bool:
    """True when stdout's or stderr's reader has gone (`| head` done reading); nothing more is written there."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if reader_gone(stream)]
    for stream in gone:
        stop_writing_to(stream)
    return bool(gone)


def unexpected_line(exc: Exception) -> str:
    """One line for an exception sparsify did not expect: out of memory, or a bug to report."""
    from sparsify.errors import original_message

    lines = [line.strip() for line in original_message(str(exc), type(exc)).splitlines() if line.strip()]
    text = " ".join(lines)
    text = text if len(text) <= 300 else text[:297] + "..."
    kind = type(exc).__name__
    if isinstance(exc, MemoryError) or kind == "OutOfMemoryError" or "can't allocate memory" in text:
        return (f"out of memory ({kind}{': ' + text if text else ''}); lower data.batch_size (or model.input_size, "
                "data.workers) and run the command again")
    where = raised_in_user_code(exc)
    if where:
        return (f"{kind}{': ' + text if text else ''} (raised in {where}, code outside sparsify: a model factory, "
                f"plugin or dataset of yours; rerun with --debug or {DEBUG_ENV}=1 for the traceback)")
    return (f"{kind}{': ' + text if text else ''} (this is a bug in sparsify; rerun with --debug or "
            f"{DEBUG_ENV}=1 for the traceback and report it)")


def raised_in_user_code(exc: BaseException) -> str | None:
    """'file.py:LINE (function)' when the innermost frame of `exc`'s traceback outside the installed packages
    and Python's standard library is not sparsify's (a `pkg.module:factory` model, a plugin); else None."""
    import os
    import sysconfig

    ours = os.path.dirname(os.path.realpath(__file__)) + os.sep
    libraries = tuple({os.path.realpath(sysconfig.get_paths()[key]) + os.sep
                       for key in ("stdlib", "platstdlib", "purelib", "platlib")})
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    for tb in reversed(frames):
        path = os.path.realpath(tb.tb_frame.f_code.co_filename)
        if path.startswith(ours):  # also when sparsify itself is installed under site-packages
            return None
        if not os.path.isfile(path) or path.startswith(libraries) or {"site-packages", "dist-packages"} & set(
                path.split(os.sep)):
            continue  # torch, the standard library, frozen modules: look further out
        return f"{os.path.basename(path)}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"
    return None


def note(message: str) -> None:
    """A remark on stderr (under torchrun, from rank 0 only)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        write_line(message, sys.stderr)


def say(message: str) -> None:
    """A result line on stdout (under torchrun, from rank 0 only)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        write_line(message, sys.stdout)
