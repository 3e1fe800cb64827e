"""`--nproc N`: refuse once what every process would refuse, then run the command again in N processes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sparsify.config import load_config
from sparsify.io.checkpoint import decode_metadata, read_metadata
from sparsify.io.rundir import RunDir
from sparsify.stages.run import check_same_run
from sparsify.training.distributed import launch

NEEDS_CHECKPOINT = ("train", "sensitivity")  # `run` starts a run folder itself


def check_before_launch(command: str, config: Optional[Path], overrides: Optional[list[str]]) -> None:
    """The config, and for a command that needs one the run folder: there, writable, not in use, with a
    checkpoint of the config's model and pattern. Checked before any process starts, so a mistake reads as
    one line, not one per process."""
    resolved = load_config(config, overrides or [])  # quietly: rank 0 notes the defaults
    if command in NEEDS_CHECKPOINT:
        run = RunDir(resolved.run_dir)
        with run.lock(command):
            latest = run.require_latest()
            check_same_run(resolved, decode_metadata(read_metadata(latest), latest))


def launch_command(command: str, config: Optional[Path], overrides: Optional[list[str]], nproc: int,
                   extra: list[str], *, quiet: bool = True) -> None:
    """`sparsify COMMAND -c CONFIG --set ... EXTRA` in `nproc` local processes (torch.distributed.run; `quiet`:
    without its log lines)."""
    argv = [command, *(["-c", str(config)] if config else [])]
    for assignment in overrides or []:
        argv += ["--set", assignment]
    launch(argv + extra, nproc=nproc, quiet=quiet)
