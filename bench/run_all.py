"""Run every benchmark, one after the other, and print one JSON dict keyed by benchmark name.

Each benchmark runs as its own process (`python bench/<name>.py`) with this interpreter; its
progress lines pass through on stderr. A benchmark that crashes or prints something that is not
JSON appears as {"error": ..., "stderr_tail": ...}. Exit status: 0 when every benchmark ran
and passed its target, 1 when one missed its target, 2 when one failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("prune_round", "train_step", "checkpoint_io", "cli_help", "patterns_fmnist", "methods_fmnist",
              "train_throughput", "imagefolder_decode", "permutation", "ddp_scaling", "threads_load",
              "distill_overhead", "sparse_speed", "compact_speed", "accuracy_fmnist")


def run_one(name: str, repeats: int | None) -> dict:
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py")]
    if repeats is not None:
        cmd += ["--repeats", str(repeats)]
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stdout_tail": proc.stdout[-2000:], "wall_s": seconds}
    try:
        result = json.loads(proc.stdout)
    except ValueError as exc:
        return {"error": f"output is not JSON ({exc})", "stdout_tail": proc.stdout[-2000:], "wall_s": seconds}
    if not isinstance(result, dict):
        return {"error": "output is not a JSON object", "wall_s": seconds}
    result["wall_s"] = seconds
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="passed to every benchmark (default: each one's own)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    p.add_argument("--out", help="also write the combined JSON to this file")
    args = p.parse_args()

    results = {name: run_one(name, args.repeats) for name in (args.only or BENCHMARKS)}
    text = json.dumps(results, indent=2)
    print(text, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for name, r in results.items():
        state = "ERROR " + r["error"] if "error" in r else ("pass" if r.get("pass") else "MISSED")
        print(f"{name:>14}: {state} ({r.get('wall_s')} s)", file=sys.stderr)
    if any("error" in r for r in results.values()):
        sys.exit(2)
    if not all(r.get("pass") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
