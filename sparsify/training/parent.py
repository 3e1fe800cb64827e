"""The ranks of a torchrun job end when the process that started them ends (on Linux).

A launcher killed with SIGKILL cannot stop its workers itself: left running, they would hold the run's
lock and go on writing to its folder, and the rerun that follows would find the run in use.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_PID = "SPARSIFY_LAUNCHER_PID"  # set by `--nproc` for its ranks: the pid of their parent
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent ends


def end_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent ends; exit now if it already has (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    if parent_gone(os.getppid(), os.environ.get(LAUNCHER_PID, "")):
        os._exit(1)


def parent_gone(parent: int, launcher: str) -> bool:
    """Whether the parent ended before the request: re-parented to init, or not the `--nproc` launcher."""
    return parent == 1 or (launcher.isdigit() and int(launcher) != parent)
