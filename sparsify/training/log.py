"""What a long run shows: the progress line (rank 0, stderr), metrics.csv and optional TensorBoard.

The progress line has loss, lr, images/s over all ranks, the share of time spent waiting for
the next batch (high: the data loader is the bottleneck), and the ETA. metrics.csv gets one
row every `train.log_every` steps.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from sparsify.io.files import append_lines, atomic_write_bytes
from sparsify.training.distributed import current_info, reduce_sums
from sparsify.errors import SparsifyError

CSV_COLUMNS = ["time", "round", "start", "epoch", "step", "loss", "lr", "images_per_s", "data_wait"]


class StepTimer:
    """Wall time split into waiting for batches and computing, overall and since the last window."""

    def __init__(self) -> None:
        self.start = self.last = self.window_start = time.perf_counter()
        self.wait = self.window_wait = 0.0
        self.images = self.window_images = 0

    def got_batch(self) -> None:
        waited = time.perf_counter() - self.last
        self.wait += waited
        self.window_wait += waited

    def stepped(self, images: int) -> None:
        self.images += images
        self.window_images += images
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return self.last - self.start

    def wait_share(self) -> float:
        return self.wait / max(self.elapsed(), 1e-9)

    def take_window(self) -> tuple[int, float, float]:
        """(images, seconds, seconds waiting) since the previous call."""
        now = self.last
        window = (self.window_images, now - self.window_start, self.window_wait)
        self.window_start, self.window_images, self.window_wait = now, 0, 0.0
        return window


class Bar:
    """The rich progress line of rank 0 (a no-op elsewhere and when stderr is not a terminal)."""

    def __init__(self, progress, task, *, global_batch: int, refresh_every: int = 10) -> None:
        self.progress, self.task, self.global_batch = progress, task, global_batch
        self.refresh_every = refresh_every

    def advance(self, *, step: int, lr: float, sums: torch.Tensor, timer: StepTimer) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=step)
        if step % self.refresh_every:
            return
        loss_sum, _, seen = sums.tolist()
        rate = timer.images * current_info().world_size / max(timer.elapsed(), 1e-9)
        status = (f"loss {loss_sum / max(seen, 1):.4f}  lr {lr:.3g}  {rate:.0f} img/s  "
                  f"data wait {100 * timer.wait_share():.0f}%")
        self.progress.update(self.task, status=status)


class TrainLog:
    """Progress line, metrics.csv rows and TensorBoard scalars of one train stage."""

    def __init__(self, *, log: Callable[[str], None] | None = None, csv_path: Path | None = None,
                 round_: int = 0, start: str = "", tensorboard_dir: Path | None = None) -> None:
        self.log, self.csv_path, self.round, self.start = log, csv_path, round_, start
        self.is_main = current_info().is_main
        self.writer = open_tensorboard(tensorboard_dir) if tensorboard_dir and self.is_main else None

    @contextmanager
    def progress(self, *, total: int, done: int, global_batch: int) -> Iterator[Bar]:
        if not (self.is_main and sys.stderr.isatty()):
            yield Bar(None, None, global_batch=global_batch)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), console=Console(stderr=True)) as progress:
            task = progress.add_task("train", total=total, completed=done, status=f"global batch {global_batch}")
            yield Bar(progress, task, global_batch=global_batch)

    def record(self, *, step: int, epoch: int, window: torch.Tensor, lr: float, timer: StepTimer,
               device: torch.device) -> None:
        """One metrics row; every rank calls this with its (loss * n, correct, n) since the last row.

        The row's loss is the mean loss per image of the steps in the window, over all ranks.
        """
        images, seconds, waited = timer.take_window()
        loss_sum, _, seen, images_all = reduce_sums([*window.tolist(), float(images)], device)
        if not self.is_main:
            return
        row = {"time": round(time.time(), 3), "round": self.round, "start": self.start, "epoch": epoch,
               "step": step, "loss": round(loss_sum / seen, 6) if seen else "", "lr": lr,
               "images_per_s": round(images_all / max(seconds, 1e-9), 1),
               "data_wait": round(waited / max(seconds, 1e-9), 4)}
        if self.csv_path is not None:
            append_row(self.csv_path, row)
        if self.writer is not None:
            for key in ("loss", "lr", "images_per_s", "data_wait"):
                if row[key] != "":
                    self.writer.add_scalar(f"train/{key}", row[key], global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(folder: Path):
    """A SummaryWriter, or a SparsifyError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SparsifyError("train.tensorboard is true but the tensorboard package is not installed; "
                            "pip install tensorboard, or set train.tensorboard: false (metrics.csv is always written)") from None
    return SummaryWriter(log_dir=str(folder))


def append_row(path: Path, row: dict) -> None:
    """Append one row to the CSV log (header first when the file is new); WriteFailed takes it back whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    if not path.is_file():
        writer.writeheader()
    writer.writerow(row)
    append_lines(path, buffer.getvalue().encode(), sync=False)  # a log: the train-state is what resumes


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.csv (empty when there is none)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        try:
            return list(csv.DictReader(f))
        except csv.Error:  # a damaged file (NUL bytes, ...): what reads as rows, the rest is left to the caller
            f.seek(0)
            return list(csv.DictReader(line.replace("\0", "") for line in f))


def drop_rows_after(path: Path, *, start: str, step: int) -> None:
    """Forget rows a killed stage wrote after its last train-state (the resumed run writes them again)."""
    rows = read_rows(path)
    kept = [r for r in rows if not (r["start"] == start and int(r["step"]) > step)]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)  # the line ends append_row writes
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_bytes(path, buffer.getvalue().encode())
