"""How many CPU threads torch uses in a command: `train.threads` / `--threads`, and what `auto` means.

`auto` resolves, in this order:

1. `OMP_NUM_THREADS` set to an integer >= 1 (torchrun sets 1 in every process): that number;
2. otherwise one less than the usable CPUs, at least 1. Usable CPUs: those this process may run
   on (`os.sched_getaffinity`), capped by the cgroup CPU quota (`cpu.max`, or `cpu.cfs_quota_us`
   under cgroup v1) rounded down, at least 1.

Why one less: torch's default (one thread per core) makes every parallel region wait for its
slowest thread, and a thread that shares its core with any other busy process is late by a
scheduler time slice. On 2 CPUs one busy process took the quickstart's training from 4,149 to 30
images/s and resnet18's from 50 to 7 with 2 threads, while 1 thread kept 3,297 and 29
(bench/threads_load.py; the README has the table). With a core left over, another process costs
a share of that core instead of a stall in every operation. OMP_WAIT_POLICY is not set here: it
only counts before torch is imported, and PASSIVE cost 28-40% on the small model when idle.

This module does not import torch at import time (`sparsify --help` stays fast).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Union

from sparsify.errors import SparsifyError, shown

Threads = Union[str, int]  # "auto" or an integer from 1 to MAX_THREADS
# torch starts every thread it is told to: 100,000 ran out of threads ("can't start new thread") and then
# crashed the process. More threads than CPUs only wait for each other; 1024 is above any machine's CPU count.
MAX_THREADS = 1024


def env_threads(env: Mapping[str, str]) -> Optional[int]:
    """OMP_NUM_THREADS as a positive integer, or None when unset or not one."""
    raw = env.get("OMP_NUM_THREADS", "").strip()
    try:
        value = int(raw)
    except ValueError:  # unset, empty or a list like "4,2" (nested levels): not a plain count
        return None
    return value if value >= 1 else None


def auto_threads(*, env: Mapping[str, str], cpus: int) -> int:
    """The `auto` rule on given values: OMP_NUM_THREADS if set (at most MAX_THREADS), else max(1, cpus - 1)."""
    from_env = env_threads(env)
    if from_env is not None:
        return min(from_env, MAX_THREADS)
    return max(1, cpus - 1)


def resolve_threads(setting: Threads, *, env: Mapping[str, str], cpus: int) -> int:
    """`train.threads` as a number: an integer stays, `auto` follows `auto_threads`."""
    if setting == "auto":
        return auto_threads(env=env, cpus=cpus)
    if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= MAX_THREADS:
        raise ValueError(f"threads must be auto or an integer from 1 to {MAX_THREADS}, got {setting!r}")
    return setting


def cgroup_quota(cpu_max: Optional[str] = None, cfs: Optional[tuple[str, str]] = None) -> Optional[float]:
    """CPUs allowed by a cgroup quota, from the text of `cpu.max` (v2) or of cfs_quota_us/cfs_period_us (v1).

    None when there is no quota ("max", -1, missing or unreadable values).
    """
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.strip().partition(" ")
            if quota != "max":
                return int(quota) / int(period or 100000)
        if cfs is not None:
            quota, period = (int(v) for v in cfs)
            if quota > 0 and period > 0:
                return quota / period
    except ValueError:
        return None
    return None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def process_cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """The CPU quota of this process's cgroup (v2 unified, else v1 `cpu`), or None."""
    lines = (_read(Path("/proc/self/cgroup")) or "").splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2: 0::/path
            for folder in (root / rel, root):
                text = _read(folder / "cpu.max")
                if text is not None:
                    return cgroup_quota(cpu_max=text)
        elif "cpu" in controllers.split(","):  # v1: N:cpu,cpuacct:/path
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for folder in (mount / rel, mount):
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    if quota is not None and period is not None:
                        return cgroup_quota(cfs=(quota, period))
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity set, capped by the cgroup quota (rounded down), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        cpus = os.cpu_count() or 1
    quota = process_cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def apply_threads(setting: Threads) -> int:
    """Resolve `setting` here (environment, CPUs) and give torch that many intra-op threads; returns it."""
    import torch

    threads = resolve_threads(setting, env=os.environ, cpus=usable_cpus())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def thread_setting(text: str) -> Threads:
    """--threads without a config: auto or an integer from 1 to MAX_THREADS."""
    if text == "auto" or (text.isdigit() and 1 <= int(text) <= MAX_THREADS):
        return text if text == "auto" else int(text)
    raise SparsifyError(f"--threads {shown(text)} is not auto or an integer from 1 to {MAX_THREADS}; e.g. --threads 2")
