"""Timing several ways of doing the same work fairly: warm-up, then interleaved rounds, medians.

Interleaving (every candidate once per round, the order rotated each round) spreads a machine's
slow moments over all candidates alike, so ratios of medians stay honest on a busy machine. A
sample repeats a fast call until it lasts at least `min_sample_s`, so batch-1 latencies are not
below the clock's resolution.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def calls_per_sample(func: Callable[[], object], *, warmup: int, min_sample_s: float, sync: Callable[[], None]) -> int:
    """Warm `func` up and return how many calls make one sample of at least `min_sample_s`."""
    seconds = math.inf
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        func()
        sync()
        seconds = min(seconds, time.perf_counter() - start)
    return max(1, math.ceil(min_sample_s / max(seconds, 1e-9)))


def interleaved_times(candidates: dict[str, Callable[[], object]], *, runs: int, warmup: int = 2,
                      min_sample_s: float = 0.02, sync: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Seconds per call of each candidate: {"median", "min", "max", "samples"}, from `runs` interleaved rounds."""
    names = list(candidates)
    repeats = {name: calls_per_sample(candidates[name], warmup=warmup, min_sample_s=min_sample_s, sync=sync)
               for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            func, count = candidates[name], repeats[name]
            start = time.perf_counter()
            for _ in range(count):
                func()
            sync()
            samples[name].append((time.perf_counter() - start) / count)
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": len(values)}
            for name, values in samples.items()}
