"""Timing executors against each other: interleaved runs, medians, an adaptive number of repeats.

Each round runs every candidate once, the order rotating from round to round, so a burst of load
from another process hits all candidates alike; the median of the rounds is the figure (first calls
are warm-up, never counted). Rounds go on until `min_repeats` are done and the layer's time
`budget_s` is spent, or `max_repeats` are done. A candidate whose first call takes over twice the
fastest first call, or whose first timed run takes over `drop_factor` times the fastest, is not
timed again (it cannot win; the baseline is always kept): calibrating a large model stays within
seconds per layer.

`interleaved_times` is the whole-model variant for `sparsify bench`: a fixed number of rounds, no
candidate dropped, each sample repeating a fast call until it lasts `min_sample_s` (batch-1 latencies
stay above the clock's resolution), with median, min and max.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

BASELINE = "dense"
DROP_AFTER = 1  # timed rounds before the candidates over `drop_factor` times the fastest are dropped
WARM_DROP_FACTOR = 2.0  # a first call this many times the fastest first call: dropped untimed


@dataclass(frozen=True)
class TimingSettings:
    """How long and how often each layer's candidates are timed, and the margin a winner needs."""

    budget_s: float = 0.2  # timed rounds stop once this is spent (after min_repeats)
    min_repeats: int = 3
    max_repeats: int = 15
    warmup: int = 1
    margin: float = 0.03  # an executor replaces dense only when at least this much faster
    drop_factor: float = 1.5  # after the first timed round: a candidate this many times the fastest is dropped
    graphs: bool = False  # on CUDA: time each candidate as a CUDA graph replay (for models run in graphs)


@dataclass
class Timings:
    """Median milliseconds per candidate, and the candidates dropped after their first timed round."""

    ms: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    repeats: int = 0


def time_candidates(candidates: dict[str, Callable[[], object]], settings: TimingSettings, *,
                    warm: dict[str, float] | None = None, sync: Callable[[], None] = lambda: None,
                    clock: Callable[[], float] = time.perf_counter, baseline: str = BASELINE,
                    drop: bool = True) -> Timings:
    """Interleaved timing of `candidates` (name -> call); `sync` waits for queued device work.

    `warm` holds the seconds of a first call already made (by the caller's own check, say): those
    candidates get no further warm-up. First calls are not counted in the medians, but a candidate
    whose first call is over WARM_DROP_FACTOR times the fastest first call is dropped at once
    (`drop=False`: every candidate is timed in every round).
    """
    settings = replace(settings, min_repeats=max(1, min(settings.min_repeats, settings.max_repeats)))
    first = dict(warm or {})
    for name, call in candidates.items():
        for _ in range(settings.warmup if name not in first else 0):
            start = clock()
            call()
            sync()
            first[name] = clock() - start
    result = Timings()
    active = list(candidates)
    if drop and baseline in first and all(name in first for name in active):
        active = keep_contenders(active, {name: [t] for name, t in first.items()}, WARM_DROP_FACTOR, baseline,
                                 result.dropped, "first call")
    samples: dict[str, list[float]] = {name: [] for name in active}
    spent = 0.0
    while result.repeats < settings.max_repeats:
        start_round = clock()
        shift = result.repeats % len(active)
        for name in active[shift:] + active[:shift]:
            start = clock()
            candidates[name]()
            sync()
            samples[name].append(clock() - start)
        spent += clock() - start_round
        result.repeats += 1
        if drop and result.repeats == DROP_AFTER and baseline in samples:
            active = keep_contenders(active, samples, settings.drop_factor, baseline, result.dropped, "timed run")
        if len(active) == 1 or (result.repeats >= settings.min_repeats and spent >= settings.budget_s):
            break  # (a lone candidate has nothing to be compared with)
    result.ms = {name: statistics.median(samples[name]) * 1e3 for name in active}
    return result


def keep_contenders(active: list[str], samples: dict[str, list[float]], factor: float, baseline: str,
                    dropped: dict[str, str], what: str) -> list[str]:
    """The candidates still worth timing (the baseline always is); the others get a reason in `dropped`."""
    fastest = min(active, key=lambda name: min(samples[name]))
    limit = factor * min(samples[fastest])
    kept = []
    for name in active:
        if name != baseline and min(samples[name]) > limit:
            runs = len(samples[name])
            dropped[name] = (f"{min(samples[name]) * 1e3:.3g} ms {'at best in ' + str(runs) + ' ' if runs > 1 else ''}"
                             f"{what}{'s' if runs > 1 else ''}, over {factor:g}x {fastest}; not timed further")
        else:
            kept.append(name)
    return kept


def pick(ms: dict[str, float], margin: float, baseline: str = BASELINE) -> tuple[str, str]:
    """The executor to keep and why: the fastest, if it beats the baseline by `margin`, else the baseline."""
    base = ms[baseline]
    best = min(ms, key=lambda name: (ms[name], name != baseline))
    if best == baseline:
        return baseline, f"{baseline} was fastest ({base:.3g} ms)"
    speedup = base / ms[best]
    if ms[best] <= (1 - margin) * base:
        return best, f"{speedup:.2f}x faster than {baseline} ({ms[best]:.3g} vs {base:.3g} ms)"
    return baseline, (f"{best} was only {1 - ms[best] / base:.1%} faster than {baseline} "
                      f"(a winner needs {margin:.0%})")


# ---------------------------------------------------------------- whole models: a fixed number of rounds


def calls_per_sample(func: Callable[[], object], *, warmup: int, min_sample_s: float, sync: Callable[[], None]) -> int:
    """Warm `func` up (its fastest call) and return how many calls make one sample of at least `min_sample_s`
    (1 without a call when `warmup` is 0 and `min_sample_s` is 0: one call per sample, none spent warming up)."""
    if warmup < 1 and min_sample_s <= 0:
        return 1
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
