"""Small helpers shared by the benchmark scripts (timing, statistics, JSON output).

Every benchmark prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parser(description: str, default_repeats: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=default_repeats,
                   help=f"interleaved repeats of target and baseline (default {default_repeats})")
    return p


def bench_threads():
    """Apply torch's CPU threads: BENCH_THREADS=N forces N, else sparsify's automatic choice; returns the count."""
    from sparsify.threads import apply_threads

    return apply_threads(int(os.environ.get("BENCH_THREADS", "0")) or "auto")


def timed(func: Callable, *args, **kwargs) -> tuple[float, object]:
    """Seconds taken by one call and its result."""
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def median(values) -> float:
    return float(statistics.median(values))


def summary(values, scale: float = 1.0, digits: int = 4) -> dict:
    """Median, min and max of a list of timings (multiplied by `scale`)."""
    values = [v * scale for v in values]
    return {
        "median": round(median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def ratio(numerator: float, denominator: float, digits: int = 4) -> float | None:
    return round(numerator / denominator, digits) if denominator else None


def environment() -> dict:
    """What the figures depend on: interpreter, torch threads, machine load at the end."""
    env = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    try:  # share of time some task waited for a CPU (other processes competing), Linux PSI
        with open("/proc/pressure/cpu") as f:
            fields = dict(kv.split("=") for kv in f.readline().split()[1:])
        env["cpu_pressure_some_avg60_pct"] = float(fields["avg60"])
    except (OSError, ValueError, KeyError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    return env


def emit(result: dict) -> None:
    """Print the benchmark's single JSON object on stdout."""
    result.setdefault("environment", environment())
    json.dump(result, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def pruned_resnet18():
    """resnet18 with one round of block 8x8 masks applied; returns model, masks, pattern."""
    import torch
    import torchvision

    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.block import BlockPattern
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    pattern = BlockPattern(8, 8)
    eligible = [l.name for l in find_layers(model, pattern, include_linear=False, exclude=[]) if l.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="variance", target=0.5, step=0.5)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    MaskEnforcer(model, masks, pattern).apply_()
    return model, masks, pattern
