"""Where the output goes is not the command's business: a reader that leaves early (`| head`, `| true`) does not
turn a finished stage into a failure, and a stdout that cannot be written (a full disk) is one clear line."""

import os
import subprocess
import sys

import pytest

from sparsify.io.rundir import RunDir


def sparsify_to_closed_pipe(*args: str, stream: str) -> subprocess.CompletedProcess:
    """Run sparsify with `stream` (stdout or stderr) a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    other = subprocess.PIPE
    try:
        return subprocess.run([sys.executable, "-m", "sparsify", *args], text=True, timeout=300,
                              stdout=write_end if stream == "stdout" else other,
                              stderr=write_end if stream == "stderr" else other,
                              env={**os.environ, "SPARSIFY_DEBUG": "0", "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write_end)


def sparsify_to_full_disk(*args: str, stream: str) -> subprocess.CompletedProcess:
    """Run sparsify with `stream` (stdout or stderr) on /dev/full, where every write fails for lack of space."""
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-m", "sparsify", *args], text=True, timeout=300,
                              stdout=full if stream == "stdout" else subprocess.PIPE,
                              stderr=full if stream == "stderr" else subprocess.PIPE,
                              env={**os.environ, "SPARSIFY_DEBUG": "0"})


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_stage_whose_reader_went_away_still_finishes_and_succeeds(workdir, cli, stream):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    done = sparsify_to_closed_pipe("prune", "-c", "tiny.yaml", stream=stream)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "bug" not in (done.stderr or "") + (done.stdout or "")
    run = RunDir(workdir / "runs/tiny")
    assert [e["stage"] for e in run.history()] == ["pretrained", "pruned"]


def test_report_and_config_to_a_reader_that_went_away_exit_quietly(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    for args in (["report", "-c", "tiny.yaml"], ["config", "-c", "tiny.yaml"]):
        done = sparsify_to_closed_pipe(*args, stream="stdout")
        assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_stdout_is_one_line(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    done = sparsify_to_full_disk("report", "-c", "tiny.yaml", stream="stdout")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: could not write to standard output: No space left on device; redirect it "
                                   "to a file on a disk with space (or to /dev/null) and run the command again")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_stage_whose_remarks_cannot_be_written_still_finishes(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    done = sparsify_to_full_disk("prune", "-c", "tiny.yaml", stream="stderr")
    assert done.returncode == 0 and done.stdout.startswith("round 1:")
    assert [e["stage"] for e in RunDir(workdir / "runs/tiny").history()] == ["pretrained", "pruned"]
