"""Benchmark: wall time of `sparsify --help` (a fresh process) vs `python -c pass`.

Target: the installed entry point (`.venv/bin/sparsify`, the one next to this interpreter;
`python -m sparsify` if there is none) with `--help`. Baseline: the same interpreter running
`-c pass`. Both are started with subprocess, alternating (ABBA order), `--repeats` times after
one untimed run of each. The environment is passed through unchanged (note that
PYTHONDONTWRITEBYTECODE, when set, makes every run compile sparsify's own modules again).

Also: `python -X importtime -m sparsify --help` must not import torch (no line of its stderr
mentions "torch"); the slowest imports are listed for reference.

Target: median wall time < 0.8 s, and torch not imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, median, parser, progress, ratio, summary  # noqa: E402

TARGET_S = 0.8


def wall(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - start, proc


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, self us, cumulative us, depth) for each line of an -X importtime report."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        try:
            fields = line[len("import time:"):].split("|", 2)
            self_us, cum_us, raw = int(fields[0]), int(fields[1]), fields[2]
        except (ValueError, IndexError):
            continue
        stripped = raw.lstrip(" ")
        depth = (len(raw) - len(stripped) - 1) // 2
        rows.append((stripped.strip(), self_us, cum_us, depth))
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0], default_repeats=9).parse_args()
    script = os.path.join(os.path.dirname(sys.executable), "sparsify")
    target_cmd = [script, "--help"] if os.path.isfile(script) else [sys.executable, "-m", "sparsify", "--help"]
    baseline_cmd = [sys.executable, "-c", "pass"]

    progress(f"target: {' '.join(target_cmd)}; baseline: {' '.join(baseline_cmd)}")
    _, first = wall(target_cmd)
    wall(baseline_cmd)
    help_ok = first.returncode == 0 and "Usage" in first.stdout

    times = {"target": [], "baseline": []}
    for rep in range(args.repeats):
        order = ("target", "baseline") if rep % 2 == 0 else ("baseline", "target")
        for kind in order:
            seconds, proc = wall(target_cmd if kind == "target" else baseline_cmd)
            if kind == "target":
                help_ok &= proc.returncode == 0
            times[kind].append(seconds)
        progress(f"repeat {rep + 1}/{args.repeats}: --help {times['target'][-1]:.3f} s, "
                 f"python -c pass {times['baseline'][-1]:.3f} s")

    importtime_cmd = [sys.executable, "-X", "importtime", "-m", "sparsify", "--help"]
    _, proc = wall(importtime_cmd)
    rows = parse_importtime(proc.stderr)
    torch_lines = [line.strip() for line in proc.stderr.splitlines() if "torch" in line]
    top_level = sorted((r for r in rows if r[3] == 0), key=lambda r: -r[2])[:10]
    by_self = sorted(rows, key=lambda r: -r[1])[:10]

    med_target, med_base = median(times["target"]), median(times["baseline"])
    torch_free = proc.returncode == 0 and bool(rows) and not torch_lines
    result = {
        "benchmark": "cli_help",
        "target_command": " ".join(target_cmd),
        "baseline_command": " ".join(baseline_cmd),
        "repeats": args.repeats,
        "seconds": {"sparsify_help": summary(times["target"]), "python_pass": summary(times["baseline"])},
        "ratio_help_over_python_pass": ratio(med_target, med_base),
        "help_minus_python_pass_s": round(med_target - med_base, 4),
        "help_exit_ok": help_ok,
        "importtime": {
            "command": " ".join(importtime_cmd),
            "modules_imported": len(rows),
            "torch_imported": bool(torch_lines),
            "lines_mentioning_torch": torch_lines[:20],
            "top_level_by_cumulative_ms": [[n, round(c / 1e3, 1)] for n, _, c, _ in top_level],
            "by_self_ms": [[n, round(s / 1e3, 1)] for n, s, _, _ in by_self],
        },
        "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "target": {"median_s_below": TARGET_S, "torch_imported": False},
        "pass_time": med_target < TARGET_S,
        "pass_no_torch": torch_free,
        "pass": bool(med_target < TARGET_S and torch_free and help_ok),
    }
    emit(result)


if __name__ == "__main__":
    main()
