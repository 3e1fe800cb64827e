"""A rank that fails under torchrun stops every rank at once, each with the same one line.

Real 2-process gloo jobs through `python -m torch.distributed.run` (each rank's stderr in its own
log file), and the relays of sparsify.training.distributed between forked gloo ranks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from sparsify.errors import DataError, RunLockedError, SparsifyError, TargetReached
from sparsify.io.rundir import RunDir
from sparsify.training.distributed import fails_together, main_holds, run_on_main
from sparsify.training.parent import parent_gone

TESTS = Path(__file__).parent
CONFIG = {"name": "t", "device": "cpu", "model": {"arch": "tiny_resnet", "num_classes": 4},
          "data": {"dataset": "fake", "fake_samples": 32, "batch_size": 8}, "train": {"epochs": 1}}
LAG_S = 15  # the processes' exits (a few seconds under load); a rank waiting for another takes 30 s or more


def torchrun(folder: Path, *args: str) -> tuple[int, float, list[str]]:
    """`sparsify ARGS` as a 2-process torchrun job in `folder`.

    Returns the exit code, the seconds from the last line a rank wrote to the end of the job, and
    the stderr of rank 0 and rank 1. A job that hangs fails at the timeout; the whole job is not
    timed, since starting three processes that import torch takes 10 s on an idle 2-core machine
    and over 30 s on a busy one.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    logs = folder / "logs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--log-dir", str(logs), "--redirects", "2", "-m", "sparsify", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    ended = time.time()
    files = [next(logs.glob(f"*/attempt_0/{rank}/stderr.log")) for rank in (0, 1)]
    return proc.returncode, ended - max(f.stat().st_mtime for f in files), [f.read_text() for f in files]


def write_config(folder: Path, **model) -> Path:
    path = folder / "t.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "model": {**CONFIG["model"], **model}}))
    return path


def assert_stopped_together(code: int, lag: float, stderr: list[str], line: str) -> None:
    """Non-zero exit soon after the ranks spoke, `line` the last line of both ranks' stderr, no traceback."""
    assert code != 0
    assert lag < LAG_S, f"the job ended {lag:.1f} s after the last rank wrote its error"
    for text in stderr:
        assert text.strip().splitlines()[-1] == line, text[-2000:]
        assert "Traceback" not in text


def test_a_locked_run_stops_every_rank_with_the_lock_message(tmp_path):
    write_config(tmp_path)
    with RunDir(tmp_path / "runs/t").lock("held by the test", create=True):
        holder = (tmp_path / "runs/t/.lock").read_text()
        code, lag, stderr = torchrun(tmp_path, "train", "-c", "t.yaml")
    assert holder.startswith(f"pid {os.getpid()} ")
    assert_stopped_together(code, lag, stderr,
                            f"error: run folder runs/t is in use by {holder}; wait for it to finish or stop it")


def test_a_sparsify_error_of_rank_0_in_download_stops_every_rank_with_its_message(tmp_path):
    write_config(tmp_path, weights="missing.safetensors")
    code, lag, stderr = torchrun(tmp_path, "run", "-c", "t.yaml")
    assert_stopped_together(code, lag, stderr,
                            "error: weights file 'missing.safetensors' does not exist; check model.weights")
    assert not (tmp_path / "runs/t/checkpoints").exists() or not any((tmp_path / "runs/t/checkpoints").iterdir())


def test_an_unexpected_exception_of_rank_0_stops_every_rank_with_its_last_traceback_line(tmp_path):
    write_config(tmp_path, arch="factory_model:build_broken")
    code, lag, (main, other) = torchrun(tmp_path, "run", "-c", "t.yaml")
    assert code != 0
    assert lag < LAG_S, f"the job ended {lag:.1f} s after the last rank wrote its error"
    line = "ValueError: no layout for 4 classes"
    assert "Traceback" in main  # rank 0 prints its own traceback; torch prefixes it with the rank
    assert main.strip().splitlines()[-1] in (line, f"[rank0]: {line}")
    assert other.strip().splitlines() == [f"error: {line}"]


# ---------------------------------------------------------------- the relays between forked gloo ranks


def broken(exc: BaseException):
    raise exc


@contextmanager
def refused_lock():
    raise RunLockedError("run folder runs/x is in use by pid 1 on host (train); wait for it to finish or stop it")
    yield


def failing_on(rank: int, exc: BaseException):
    """A fails_together block that raises `exc` on `rank` only."""
    with fails_together():
        if dist.get_rank() == rank:
            raise exc
    return "no error"


CASES = {
    "result": lambda: run_on_main(lambda: {"round": 2}),
    "value error": lambda: run_on_main(broken, ValueError("bad width 7")),
    "target reached": lambda: run_on_main(broken, TargetReached("every layer is at its target")),
    "interrupt": lambda: run_on_main(broken, KeyboardInterrupt()),
    "exit": lambda: run_on_main(broken, SystemExit(4)),
    "lock": lambda: main_holds(refused_lock()).__enter__(),
    "rank 1 fails": lambda: failing_on(1, DataError("data folder /d/train does not exist on this node")),
    "none fails": lambda: failing_on(5, DataError("never")),
}


def outcome(case) -> str:
    try:
        return f"returned {case()!r}"
    except BaseException as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", None))
        return f"{type(exc).__name__} ({code}): {exc}"


def _relay_rank(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {name: outcome(case) for name, case in CASES.items()}
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_every_rank_raises_what_rank_0_raised_and_what_any_rank_raised_in_a_block(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_relay_rank, args=(str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    main, other = (json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1))
    lock = "RunLockedError (1): run folder runs/x is in use by pid 1 on host (train); wait for it to finish or stop it"
    assert main == {
        "result": "returned {'round': 2}",
        "value error": "ValueError (None): bad width 7",
        "target reached": "TargetReached (3): every layer is at its target",
        "interrupt": "KeyboardInterrupt (None): ",
        "exit": "SystemExit (4): 4",
        "lock": lock,
        "rank 1 fails": "DataError (1): data folder /d/train does not exist on this node",
        "none fails": "returned 'no error'",
    }
    assert other == {**main, "value error": "SparsifyError (1): ValueError: bad width 7"}


def test_one_process_runs_and_raises_as_it_is(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_on_main(lambda: 3) == 3
    with pytest.raises(ValueError, match="^bad$"):
        run_on_main(broken, ValueError("bad"))
    with pytest.raises(SparsifyError, match="^x$"), fails_together():
        raise SparsifyError("x")


def children_of(pid: int) -> set[int]:
    """The processes `pid` started, from any of its threads."""
    return {int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to read it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ranks end with their parent on Linux")
def test_ranks_end_with_a_launcher_killed_with_sigkill_and_the_rerun_finds_the_run_free(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "fake_samples": 4000}}))
    subprocess.run([sys.executable, "-m", "sparsify", "download", "-c", str(config)], cwd=tmp_path, check=True,
                   capture_output=True)
    launcher = subprocess.Popen([sys.executable, "-m", "sparsify", "train", "-c", str(config), "--nproc", "2"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock, deadline = tmp_path / "runs/t/.lock", time.monotonic() + 90
    try:
        while not ((ranks := children_of(launcher.pid)) and any(lock.read_text().startswith(f"pid {pid} ") for pid in ranks)):
            assert launcher.poll() is None and time.monotonic() < deadline, "no rank took the run's lock"
            time.sleep(0.05)
    finally:
        launcher.kill()
    assert len(ranks) == 2
    launcher.wait()
    deadline = time.monotonic() + 20
    try:
        while any(alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "a rank outlived its launcher"
            time.sleep(0.05)
    finally:
        for pid in filter(alive, ranks):
            os.kill(pid, signal.SIGKILL)
    done = subprocess.run([sys.executable, "-m", "sparsify", "eval", "-c", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # the lock was not left held


def test_a_rank_whose_parent_ended_before_it_asked_to_end_with_it_exits():
    assert parent_gone(1, "") and parent_gone(501, "500")  # re-parented to init, or to a subreaper
    assert not parent_gone(500, "500") and not parent_gone(500, "")  # torchrun's own ranks: no pid to compare
