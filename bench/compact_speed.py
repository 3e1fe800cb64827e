"""Benchmark: what the channel pattern and `export --compact` buy in speed on every runtime's dense kernels.

For resnet50 and mobilenet_v2 (random weights, 224 px) each case is a run made by the pipeline
itself (`download`, then one `prune` round straight to the target: pattern channel, criterion l1,
step 1.0, BatchNorm re-estimated on fake data); the checkpoint is then compacted as `export
--compact` does (outputs checked against the masked model) and the compact model is timed against
the dense one (the round-0 checkpoint) at batch 1 and 32: medians of interleaved runs after
warm-up, on the CPU threads sparsify picks (BENCH_THREADS to force). Reported per case: the
multiply-adds and parameters left, the compact/dense time ratio and the speedup, the zero channels
compaction had to keep (with the first reason).

Goal (issue "smaller dense models"): resnet50 at half its multiply-adds: compact at least 1.7x
faster than dense at batch 32 on 2 CPU cores. By default the targets are shares of the model's
multiply-adds (`scope: global`, one ranking of channels over the model); with `--scope layer` they
are shares of the channels of each layer (0.3 of the channels leaves about half of a ResNet's
multiply-adds).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import bench_threads, emit, progress  # noqa: E402

ARCHS = ("resnet50", "mobilenet_v2")
GOAL_SPEEDUP = 1.7


def make_run(runs_dir: str, arch: str, target: float, *, input_size: int, scope: str):
    """download + one channel prune round straight to `target`; returns the config."""
    from sparsify.config import load_config
    from sparsify.stages import download, prune

    overrides = [f"name={arch}-channel-{target}", f"runs_dir={runs_dir}", "device=cpu", f"model.arch={arch}",
                 "model.weights=null", "model.num_classes=1000", f"model.input_size={input_size}",
                 "data.dataset=fake", "data.fake_samples=64", "data.batch_size=16",
                 'sparsity.pattern={"type": "channel"}', "sparsity.criterion=l1", "sparsity.step=1.0",
                 f"sparsity.target={target}", f"sparsity.scope={scope}", "sparsity.recalibrate_bn=2"]
    config = load_config(None, overrides)
    download(config)
    prune(config)
    return config


def measure(config, *, input_size: int, batches: tuple[int, ...], repeats: int) -> dict:
    import torch

    from sparsify.io.restore import load_run
    from sparsify.io.rundir import RunDir
    from sparsify.runtime.timing import interleaved_times
    from sparsify.stages.costs import compaction_costs

    run = RunDir(config.run_dir)
    dense = load_run(run, path=run.checkpoints()[0]).model.eval()
    masked = load_run(run).model.eval()
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    compact, record = compaction_costs(masked, example)
    if compact is None:
        return {"error": record["error"]}
    row = {"macs_left": round(record["macs_after"] / record["macs_before"], 4),
           "params_left": round(record["params_after"] / record["params_before"], 4),
           "removed_channels": record["removed_channels"],
           "kept_zero_channels": sum(p["kept_zero"] for p in record["kept"]),
           "first_kept_reason": record["kept"][0]["reason"] if record["kept"] else None}
    for batch in batches:
        x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            times = interleaved_times({"dense": lambda: dense(x), "compact": lambda: compact(x)}, runs=repeats)
        d, c = times["dense"]["median"], times["compact"]["median"]
        row[f"batch{batch}"] = {"dense_ms": round(d * 1e3, 2), "compact_ms": round(c * 1e3, 2),
                                "compact_min_max_ms": [round(times["compact"]["min"] * 1e3, 2),
                                                       round(times["compact"]["max"] * 1e3, 2)],
                                "compact_vs_dense": round(c / d, 4), "speedup": round(d / c, 3)}
    return row


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed runs per model (default 7)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--targets", default="0.5", help="shares of the multiply-adds (scope global) or of each "
                                                    "layer's channels (scope layer) (default 0.5)")
    p.add_argument("--scope", default="global", choices=("layer", "global"))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--input-size", type=int, default=224)
    args = p.parse_args()

    import torch

    threads = bench_threads()
    batches = tuple(int(b) for b in args.batches.split(","))
    figures: dict = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for arch in args.archs.split(","):
            for target in (float(t) for t in args.targets.split(",")):
                progress(f"{arch} channel@{target}: pipeline run")
                config = make_run(runs_dir, arch, target, input_size=args.input_size, scope=args.scope)
                progress(f"{arch} channel@{target}: compact and time at batches {batches}")
                figures.setdefault(arch, {})[f"channel@{target}"] = row = measure(
                    config, input_size=args.input_size, batches=batches, repeats=args.repeats)
                progress(f"{arch} channel@{target}: {row}")
    goals = {}
    for case, row in figures.get("resnet50", {}).items():
        if "batch32" in row and 0.4 <= row["macs_left"] <= 0.6:
            speed = row["batch32"]["speedup"]
            goals[f"resnet50_{case}_batch32"] = {"macs_left": row["macs_left"], "speedup": speed,
                                                 "goal": GOAL_SPEEDUP, "met": speed >= GOAL_SPEEDUP}
    emit({"benchmark": "compact_speed", "threads": threads, "torch": torch.__version__,
          "input_size": args.input_size, "scope": args.scope, "figures": figures, "goals": goals,
          "met": bool(goals) and all(g["met"] for g in goals.values())})


if __name__ == "__main__":
    main()
