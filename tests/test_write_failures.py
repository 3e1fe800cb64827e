"""A write that fails (file-size limit, no space, no permission) loses nothing: the old files stay as
they were, no temporary file is left, the user gets one line naming the file, and a rerun works.

The failures are real: a child process with RLIMIT_FSIZE (write() returns EFBIG), /dev/full
(ENOSPC), a read-only folder (EACCES); in-process limits are put back after each call.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sparsify.errors import WriteFailed
from sparsify.io.checkpoint import load_checkpoint, save_checkpoint
from sparsify.io.files import append_lines, atomic_write_bytes, write_failure
from sparsify.io.rundir import RunDir
from sparsify.training.log import append_row, read_rows

RUN = Path("runs/tiny")
LIMIT_REASON = "file too large for the limit (RLIMIT_FSIZE); nothing was changed: raise the file-size limit"


def limited(max_bytes: int, *, ignore_sigxfsz: bool):
    """preexec_fn: files of this process may not grow past `max_bytes`."""

    def apply() -> None:
        if ignore_sigxfsz:  # Python ignores it already; said here so that write() surely returns EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    return apply


def sparsify_limited(command: str, max_bytes: int, *options: str,
                     ignore_sigxfsz: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparsify", command, "-c", "tiny.yaml", *options], env=env, text=True,
                          capture_output=True, timeout=300, preexec_fn=limited(max_bytes, ignore_sigxfsz=ignore_sigxfsz))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the run folder but the lock (its holder line changes with each command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def temporary_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def the_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def test_prune_past_the_file_size_limit_changes_nothing_and_a_rerun_works(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    pretrained = RUN / "checkpoints" / "000-r00-pretrained.safetensors"
    limit = pretrained.stat().st_size  # the download stage's files fit; the pruned checkpoint (masks too) does not
    before = snapshot(RUN)

    done = sparsify_limited("prune", limit)

    assert done.returncode == 1
    pruned = RUN / "checkpoints" / "001-r01-pruned.safetensors"
    assert the_error_line(done.stderr) == (
        f"error: could not write {pruned}: {LIMIT_REASON} (ulimit -f) and run the command again")
    assert temporary_files(RUN) == []
    assert snapshot(RUN) == before  # the checkpoint, history.jsonl, config.yaml: byte for byte

    assert cli("prune", "-c", "tiny.yaml")[0] == 0
    assert pruned.stat().st_size > limit  # the limit, and nothing else, stopped the first try
    history = RunDir(RUN).history()
    assert [e["checkpoint"] for e in history] == [pretrained.name, pruned.name]
    load_checkpoint(pruned, expected_sha256=history[-1]["sha256"])


def test_download_force_past_the_file_size_limit_keeps_the_old_run(workdir, cli):
    for command in ("download", "prune"):
        assert cli(command, "-c", "tiny.yaml")[0] == 0, command
    pretrained = RUN / "checkpoints" / "000-r00-pretrained.safetensors"
    before = snapshot(RUN)

    done = sparsify_limited("download", pretrained.stat().st_size - 1, "--force")  # the new round 0 does not fit

    assert done.returncode == 1
    assert "nothing was changed" in the_error_line(done.stderr)
    assert temporary_files(RUN) == []
    assert snapshot(RUN) == before  # both checkpoints and the history, byte for byte: the run still goes on

    assert cli("download", "-c", "tiny.yaml", "--force")[0] == 0
    assert [e["checkpoint"] for e in RunDir(RUN).history()] == [pretrained.name]


@pytest.mark.parametrize("tiny_sections", [{"train": {"save_every_steps": 1}, "sparsity": {"target": 0.75}}])
def test_train_past_the_file_size_limit_keeps_metrics_history_and_checkpoints(workdir, cli):
    for command in ("download", "prune", "train", "prune"):  # metrics.csv of the first round exists
        assert cli(command, "-c", "tiny.yaml")[0] == 0, command
    latest = RunDir(RUN).latest()
    limit = latest.stat().st_size + 1024  # every file there fits; the train-state (momentum too) does not
    before = snapshot(RUN)
    rows = read_rows(RUN / "metrics.csv")

    done = sparsify_limited("train", limit, ignore_sigxfsz=False)  # the CLI needs no help with SIGXFSZ

    assert done.returncode == 1
    assert the_error_line(done.stderr).startswith(f"error: could not write {RUN / 'train-state.safetensors'}: "
                                                  f"{LIMIT_REASON}")
    assert temporary_files(RUN) == []
    assert snapshot(RUN) == before  # checkpoints, history.jsonl and metrics.csv (its rows of this try taken back)
    assert read_rows(RUN / "metrics.csv") == rows

    assert cli("train", "-c", "tiny.yaml")[0] == 0
    assert [e["stage"] for e in RunDir(RUN).history()] == ["pretrained", "pruned", "trained", "pruned", "trained"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoints_folder_is_one_line(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    folder = RUN / "checkpoints"
    before = snapshot(RUN)
    folder.chmod(0o555)
    try:
        code, _, err = cli("prune", "-c", "tiny.yaml")
    finally:
        folder.chmod(0o755)
    assert code == 1
    assert the_error_line(err) == (f"error: could not write {folder / '001-r01-pruned.safetensors'}: permission "
                                   f"denied; nothing was changed: make {folder} writable for this user and run "
                                   "the command again")
    assert snapshot(RUN) == before and temporary_files(RUN) == []


# ---------------------------------------------------------------- the write functions, in-process


@contextmanager
def file_size_limit(max_bytes: int):
    """RLIMIT_FSIZE for this process (SIGXFSZ ignored, as Python does), put back afterwards."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_that_does_not_fit_keeps_the_old_one(tmp_path):
    path = tmp_path / "c.safetensors"
    small = {"w": torch.arange(4.0)}
    sha = save_checkpoint(path, small, {}, {"round": 0})
    old = path.read_bytes()
    with file_size_limit(len(old) + 100):
        with pytest.raises(WriteFailed, match=f"could not write {path}: file too large for the limit"):
            save_checkpoint(path, {"w": torch.arange(1000.0)}, {}, {"round": 1})
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["c.safetensors"]
    assert load_checkpoint(path, expected_sha256=sha).meta["round"] == 0


def test_an_append_cut_short_is_taken_back_whole(tmp_path):
    run = RunDir(tmp_path)
    run.append_history({"checkpoint": "000-r00-pretrained.safetensors", "sha256": "ab"})
    old = run.history_path.read_bytes()
    with file_size_limit(len(old) + 10):  # part of the next line would fit: it must not stay
        with pytest.raises(WriteFailed, match="history.jsonl: file too large"):
            run.append_history({"checkpoint": "001-r01-pruned.safetensors", "sha256": "cd" * 32})
    assert run.history_path.read_bytes() == old
    csv_path = tmp_path / "metrics.csv"
    append_row(csv_path, {"time": 1, "round": 1, "start": "a", "epoch": 0, "step": 1, "loss": 0.5, "lr": 0.1,
                          "images_per_s": 10, "data_wait": 0})
    rows = csv_path.read_bytes()
    with file_size_limit(len(rows) + 5):
        with pytest.raises(WriteFailed, match="metrics.csv: file too large"):
            append_row(csv_path, {"time": 2, "round": 1, "start": "a", "epoch": 0, "step": 2, "loss": 0.25,
                                  "lr": 0.1, "images_per_s": 10, "data_wait": 0})
    assert csv_path.read_bytes() == rows


def test_a_line_appended_after_a_last_line_without_its_newline_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}')  # edited by hand, saved without the final newline
    append_lines(path, b'{"c": 3}\n')
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    append_lines(path, b'{"d": 4}\n')  # a complete last line gets nothing added
    assert path.read_bytes().splitlines()[-2:] == [b'{"c": 3}', b'{"d": 4}']


def test_a_file_the_limit_stops_at_once_is_not_left_behind(tmp_path):
    with file_size_limit(0):
        with pytest.raises(WriteFailed):
            append_lines(tmp_path / "new.jsonl", b"{}\n")
        with pytest.raises(WriteFailed):
            atomic_write_bytes(tmp_path / "config.yaml", b"name: x\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_no_space_left_names_the_file_and_the_fix():
    with pytest.raises(WriteFailed) as info:
        append_lines(Path("/dev/full"), b"x" * 100)
    assert str(info.value) == ("could not write /dev/full: no space left on device; nothing was changed: "
                               "free space and run the command again")


@pytest.mark.parametrize("code, expected", [
    (errno.EACCES, "permission denied; nothing was changed: make runs/x writable for this user"),
    (errno.EROFS, "read-only file system; nothing was changed: put the run folder (runs_dir) on a writable disk"),
    (errno.EDQUOT, "disk quota exceeded; nothing was changed: free space or raise the quota"),
    (errno.EIO, "Input/output error; nothing was changed: check the disk"),
])
def test_each_reason_has_its_fix(code, expected):
    error = write_failure(Path("runs/x/history.jsonl"), OSError(code, os.strerror(code)))
    assert str(error) == f"could not write runs/x/history.jsonl: {expected} and run the command again"
