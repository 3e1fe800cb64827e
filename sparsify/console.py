"""Progress for people on stderr: one line (`log`) or a bar (`Progress`); under torchrun only rank 0 speaks."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """Progress for people, on stderr; under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


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
