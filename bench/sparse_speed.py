"""Benchmark: what each pattern buys in speed, through `sparsify bench` on real pipeline checkpoints.

For resnet50 and mobilenet_v2 (random weights, 224 px) each case is a run made by the pipeline
itself (`download`, then one `prune` round straight to the target: step 1.0, criterion l1):
8x8 blocks at 50%, 75% and 90%; unstructured at 80% and 90% followed by seed 002's regroup into
dense blocks; 2:4 (no permutation). Each run is then measured by the bench stage at batch 1 and
32: dense (the round-0 checkpoint), masked (dense kernels) and calibrated (the fastest executor
per layer), medians of interleaved runs.

Goals (issue "what pruning buys, measured"):
  * calibrated / dense median time <= 1.02 in every row;
  * resnet50, regrouped unstructured at 90%, batch 32: dense / calibrated >= 1.3;
  * resnet50, 8x8 at 75%: per-layer speedup on 1x1 convolutions >= 1.2 (reported per batch);
  * calibrating resnet50 takes at most 60 s per batch size.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import bench_threads, emit, progress  # noqa: E402

CASES = {  # name -> sparsity section
    "8x8@50": {"pattern": {"type": "block", "block": [8, 8]}, "target": 0.5},
    "8x8@75": {"pattern": {"type": "block", "block": [8, 8]}, "target": 0.75},
    "8x8@90": {"pattern": {"type": "block", "block": [8, 8]}, "target": 0.9},
    "regroup@80": {"pattern": {"type": "unstructured"}, "target": 0.8, "regroup": {"enabled": True}},
    "regroup@90": {"pattern": {"type": "unstructured"}, "target": 0.9, "regroup": {"enabled": True}},
    "2:4": {"pattern": {"type": "nm", "n": 2, "m": 4}, "target": 0.5, "permute": {"enabled": False}},
}
ARCHS = ("resnet50", "mobilenet_v2")
CALIBRATION_LIMIT_S = 60.0


def make_run(runs_dir: str, arch: str, case: str, *, input_size: int):
    """download + one prune round to the case's target; returns the run folder."""
    from sparsify.config import load_config
    from sparsify.stages import download, prune

    sparsity = {"criterion": "l1", "step": 1.0, **CASES[case]}
    overrides = [f"name={arch}-{case.replace(':', 'x').replace('@', '-')}", f"runs_dir={runs_dir}", "device=cpu",
                 f"model.arch={arch}", "model.weights=null", "model.num_classes=1000", f"model.input_size={input_size}",
                 "data.dataset=fake", "data.fake_samples=64"]
    overrides += [f"sparsity.{key}={value}" for key, value in flatten(sparsity)]
    config = load_config(None, overrides)
    download(config)
    prune(config)
    return config.run_dir


def flatten(section: dict, prefix: str = ""):
    import json

    for key, value in section.items():
        if isinstance(value, dict) and key != "pattern":
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value) if isinstance(value, (dict, list)) else value


def one_by_one_speedups(result: dict, batch: int) -> dict:
    """Per-layer speedups (dense / chosen) of the 1x1 convolutions at `batch`."""
    speedups = [row["speedup"] for row in result["layers"] if row["batch"] == batch and row["kind"].startswith("conv 1x1")]
    best = [max(row["times_ms"]["dense"] / t for n, t in row["times_ms"].items() if n != "dense")
            for row in result["layers"] if row["batch"] == batch and row["kind"].startswith("conv 1x1")
            and len(row["times_ms"]) > 1]
    return {"layers": len(speedups), "chosen_median": round(statistics.median(speedups), 3) if speedups else None,
            "best_executor_median": round(statistics.median(best), 3) if best else None,
            "best_executor_max": round(max(best), 3) if best else None}


def summarize(result: dict, calibration_s: dict, checks: dict | None = None) -> dict:
    rows = {}
    for batch in result["batches"]:
        by_model = {row["model"]: row for row in result["end_to_end"] if row["batch"] == batch}
        rows[f"batch{batch}"] = {
            "dense_ms": by_model["dense"]["median_ms"], "masked_vs_dense": by_model["masked"]["vs_dense"],
            "calibrated_vs_dense": by_model["calibrated"]["vs_dense"],
            "speedup": round(1 / by_model["calibrated"]["vs_dense"], 3),
            "sparse_layers": sum(r["chosen"] != "dense" for r in result["layers"] if r["batch"] == batch),
            "calibration_s": calibration_s.get(batch), "whole_model_check": (checks or {}).get(batch),
            "conv1x1": one_by_one_speedups(result, batch)}
    return {"density": round(result["costs"]["effective_macs"] / result["costs"]["macs"], 4), **rows}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per model (default 5)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--input-size", type=int, default=224)
    args = p.parse_args()

    import torch

    from sparsify.stages.bench import BenchSettings, bench

    threads = bench_threads()
    batches = tuple(int(b) for b in args.batches.split(","))
    figures: dict = {}
    goals: dict = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for arch in args.archs.split(","):
            for case in args.cases.split(","):
                progress(f"{arch} {case}: pipeline run")
                run_dir = make_run(runs_dir, arch, case, input_size=args.input_size)
                progress(f"{arch} {case}: bench at batches {batches}")
                result = bench(run_dir, BenchSettings(batches=batches, runs=args.repeats))
                figures.setdefault(arch, {})[case] = summarize(result, *calibration_seconds(run_dir))
                progress(f"{arch} {case}: {figures[arch][case]}")
    worst = max(row["calibrated_vs_dense"] for arch in figures.values() for case in arch.values()
                for key, row in case.items() if key.startswith("batch"))
    goals["calibrated_never_slower"] = {"worst_calibrated_vs_dense": worst, "goal": 1.02, "met": worst <= 1.02}
    r50 = figures.get("resnet50", {})
    if "regroup@90" in r50 and "batch32" in r50["regroup@90"]:
        speed = r50["regroup@90"]["batch32"]["speedup"]
        goals["regroup90_resnet50_batch32"] = {"speedup": speed, "goal": 1.3, "met": speed >= 1.3}
    if "8x8@75" in r50:
        per = {key: row["conv1x1"]["best_executor_median"] for key, row in r50["8x8@75"].items()
               if key.startswith("batch")}
        goals["blocks75_resnet50_conv1x1"] = {"best_executor_median_speedup": per, "goal": 1.2,
                                              "met": all(v is not None and v >= 1.2 for v in per.values())}
    slowest = max((row["calibration_s"] or 0.0) for case in r50.values() for key, row in case.items()
                  if key.startswith("batch")) if r50 else None
    if slowest is not None:
        goals["calibration_resnet50_s"] = {"slowest": slowest, "goal": CALIBRATION_LIMIT_S,
                                           "met": slowest <= CALIBRATION_LIMIT_S}
    emit({"benchmark": "sparse_speed", "threads": threads, "torch": torch.__version__, "input_size": args.input_size,
          "figures": figures, "goals": goals, "met": all(g["met"] for g in goals.values())})


def calibration_seconds(run_dir) -> tuple[dict, dict]:
    """Seconds each batch size's calibration took, and its whole-model check, from the run's calibration.json."""
    import json
    from pathlib import Path

    data = json.loads((Path(run_dir) / "calibration.json").read_text())
    return ({entry["key"]["batch"]: entry["seconds"] for entry in data["entries"]},
            {entry["key"]["batch"]: entry.get("end_to_end") for entry in data["entries"]})


if __name__ == "__main__":
    main()
