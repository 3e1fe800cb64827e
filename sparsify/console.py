"""Progress for people on stderr: one line (`log`) or a bar (`Progress`); under torchrun only rank 0 speaks."""

from __future__ import annotations

import os
import sys

from sparsify.errors import SparsifyError


def log(message: str) -> None:
    """Progress for people, on stderr; under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        write_line(message, sys.stderr)


def write_line(message: str, stream) -> None:
    """Print one line to `stream`; once its reader has gone (`| head` that finished, `| true`), this and later
    output are dropped and the command goes on: what it writes to the run folder is its result. A result line
    that cannot be written otherwise (stdout on a full disk) is an error; a remark on stderr is dropped."""
    try:
        print(message, file=stream, flush=True)
    except BrokenPipeError:
        stop_writing_to(stream)
    except OSError as exc:  # e.g. redirected to a full disk
        stop_writing_to(stream)
        if stream is not sys.stdout:  # remarks and progress: the work goes on without them
            return
        raise SparsifyError(f"could not write to standard output: {exc.strerror or exc}; redirect it to a file on "
                            "a disk with space (or to /dev/null) and run the command again") from None


def stop_writing_to(stream) -> None:
    """Send later output to `stream` (and its flush at exit) to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a test's captured stream)
        pass


def reader_gone(stream) -> bool:
    """True when `stream` is a pipe whose reading end has been closed."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


class Progress:
    """A progress bar of `total` items on stderr (rank 0): rich's bar on a terminal, else one line per step."""

    def __init__(self, label: str, *, total: int, done: int = 0) -> None:
        self.label, self.total, self.done = label, total, done
        self.bar = self.task = None

    def __enter__(self) -> "Progress":
        if os.environ.get("RANK", "0") == "0" and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[item]}"), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.done, item="")
        return self

    def advance(self, count: int, item: str = "") -> None:
        """`count` more items are done (`item`: what the last one was)."""
        self.done += count
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, item=item)
        else:
            log(f"{self.label}: {self.done}/{self.total}" + (f" ({item})" if item else ""))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
