"""Benchmark: what 2:4 buys on an NVIDIA GPU, through the semi_structured executor (bfloat16).

For convnext_tiny, vit_b_16 and resnet50 (random weights, 224 px) each case is a run made by the
pipeline itself (`download`, then one `prune` round straight to 2:4: pattern nm 2:4, criterion l1, no
channel permutation). Then, on the GPU in `--dtype` (default bfloat16):

  * `sparsify bench` at `--batches` (default 64 and 256): dense, masked and calibrated end to end
    (medians of interleaved runs), and how many layers calibration put on semi_structured;
  * every layer the executor applies to (Linear layers; 1x1 convs with stride 1), alone on its real
    input at the largest batch: the dense layer against the executor, timed with CUDA events,
    medians of interleaved rounds, once called eagerly and once as CUDA graph replays (torch sets
    up cuSPARSELt on the host at every 2:4 call; a replay leaves only the kernels). Per model: the
    sum of the Linear layers' dense times over the sum of their 2:4 times, and the same for the
    1x1 convs.

`--cuda-graph` runs the end-to-end bench with every model in CUDA graphs (`sparsify bench --cuda-graph`).

Goal (issue "what pruning buys, measured"): the Linear layers of convnext_tiny and vit_b_16 at
batch 256 in bfloat16 at least 1.2x faster with 2:4.

`--out FILE` also writes the JSON after every model, so a run cut short keeps what it measured.
On a machine without CUDA, `--device cpu --dtype float32` runs the same plumbing (no layer applies).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import bench_threads, emit, progress  # noqa: E402
from sparse_speed import make_run  # noqa: E402

from sparsify.errors import first_line  # noqa: E402

ARCHS = ("convnext_tiny", "vit_b_16", "resnet50")
GOAL_ARCHS = ("convnext_tiny", "vit_b_16")
GOAL_SPEEDUP = 1.2


def capture_inputs(model, example) -> dict:
    """The input of each SparseLayer's first call in one forward pass of `example`."""
    import torch

    from sparsify.runtime import sparse_layers

    inputs, hooks = {}, []
    for name, layer in sparse_layers(model).items():
        hooks.append(layer.register_forward_pre_hook(
            lambda module, args, name=name: inputs.setdefault(name, args[0].detach())))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def event_ms(call, iterations: int) -> float:
    """Milliseconds per call of `call`, averaged over `iterations` back-to-back calls (CUDA events)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iterations


def interleaved_ms(calls: dict, *, rounds: int, iterations: int) -> dict:
    """Median milliseconds per call of each call, rounds interleaved (order reversed every other round)."""
    import torch

    for call in calls.values():  # warm-up (cuSPARSELt plans its kernel on the first call)
        call()
    torch.cuda.synchronize()
    samples = {key: [] for key in calls}
    for index in range(rounds):
        for key in (list(calls) if index % 2 == 0 else list(calls)[::-1]):
            samples[key].append(event_ms(calls[key], iterations))
    return {key: statistics.median(values) for key, values in samples.items()}


def layer_speedups(model, example, *, rounds: int, iterations: int) -> list[dict]:
    """Dense vs semi_structured on every layer the executor applies to, on the layer's real input: called
    eagerly, and as CUDA graph replays (what is left without the host's cost per call)."""
    import torch

    from sparsify.runtime import sparse_layers
    from sparsify.runtime.graphs import graph_replays
    from sparsify.runtime.semistructured import SemiStructured

    layers = sparse_layers(model)
    inputs = capture_inputs(model, example)
    rows = []
    for name, layer in layers.items():
        probe = SemiStructured()
        if name not in inputs or layer.reason(probe) is not None:
            continue
        row = {"layer": name, "kind": layer.kind, "weight": list(layer.weight.shape)}
        try:
            probe.prepare(layer.module, layer.mask)
        except (RuntimeError, NotImplementedError) as exc:
            rows.append({**row, "failed": f"{type(exc).__name__}: {first_line(exc)[:200]}"})
            continue
        x = inputs[name]
        calls = {"dense": lambda: layer.dense.forward(x), "semi_structured": lambda: probe.forward(x)}
        with torch.inference_mode():
            eager = interleaved_ms(calls, rounds=rounds, iterations=iterations)
            replays, failed = graph_replays(calls, x.device)
            graphed = interleaved_ms(replays, rounds=rounds, iterations=iterations) if len(replays) == 2 else {}
        row.update({"input": list(x.shape), "dense_ms": round(eager["dense"], 4),
                    "semi_structured_ms": round(eager["semi_structured"], 4),
                    "speedup": round(eager["dense"] / eager["semi_structured"], 3)})
        if graphed:
            row.update({"graph_dense_ms": round(graphed["dense"], 4),
                        "graph_semi_structured_ms": round(graphed["semi_structured"], 4),
                        "graph_speedup": round(graphed["dense"] / graphed["semi_structured"], 3)})
        else:
            row["graph_failed"] = failed
        rows.append(row)
        del replays
    return rows


def totals(rows: list[dict]) -> dict:
    """Per kind of layer (linear, conv 1x1) and way of calling (eager, graph): count, summed times and
    their ratio, median per-layer speedup."""
    out = {}
    for kind in ("linear", "conv 1x1"):
        for way, prefix in (("eager", ""), ("graph", "graph_")):
            chosen = [row for row in rows if row["kind"].startswith(kind) and f"{prefix}dense_ms" in row]
            if not chosen:
                continue
            dense = sum(r[f"{prefix}dense_ms"] for r in chosen)
            sparse = sum(r[f"{prefix}semi_structured_ms"] for r in chosen)
            speedups = [r[f"{prefix}speedup"] for r in chosen]
            out[f"{kind} {way}"] = {"layers": len(chosen), "dense_ms": round(dense, 3),
                                    "semi_structured_ms": round(sparse, 3), "speedup": round(dense / sparse, 3),
                                    "median_layer_speedup": round(statistics.median(speedups), 3),
                                    "min_layer_speedup": min(speedups), "max_layer_speedup": max(speedups)}
    return out


def end_to_end(result: dict) -> dict:
    rows = {}
    for batch in result["batches"]:
        by_model = {row["model"]: row for row in result["end_to_end"] if row["batch"] == batch}
        layers = [r for r in result["layers"] if r["batch"] == batch]
        rows[f"batch{batch}"] = {
            "dense_ms": by_model["dense"]["median_ms"], "masked_vs_dense": by_model["masked"]["vs_dense"],
            "calibrated_vs_dense": by_model["calibrated"]["vs_dense"],
            "speedup": round(1 / by_model["calibrated"]["vs_dense"], 3),
            "semi_structured_layers": sum(r["chosen"] == "semi_structured" for r in layers),
            "applicable_layers": sum("semi_structured" not in r["skipped"] for r in layers),
            "pruned_layers": len(layers)}
    return rows


def goals_of(figures: dict, batch: int) -> dict:
    goals = {}
    for arch in GOAL_ARCHS:
        for way in ("eager", "graph"):
            linear = figures.get(arch, {}).get("layers_alone", {}).get(f"linear {way}")
            if linear is not None and figures[arch]["layers_batch"] == batch:
                goals[f"{arch}_linear_{way}_batch{batch}"] = {"speedup": linear["speedup"], "goal": GOAL_SPEEDUP,
                                                              "met": linear["speedup"] >= GOAL_SPEEDUP}
    worst = [row["calibrated_vs_dense"] for fig in figures.values() for key, row in fig["end_to_end"].items()]
    if worst:
        goals["calibrated_never_slower"] = {"worst_calibrated_vs_dense": max(worst), "goal": 1.02,
                                            "met": max(worst) <= 1.02}
    return goals


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--batches", default="64,256")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cuda-graph", action="store_true", help="bench every model as CUDA graph replays")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed runs per model (default 7)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per layer alone (default 7)")
    p.add_argument("--iterations", type=int, default=10, help="calls per round per layer alone (default 10)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--out", help="also write the JSON here after every model")
    args = p.parse_args()

    import torch

    from sparsify.runtime import deploy
    from sparsify.runtime.calibrate import device_name
    from sparsify.runtime.load import input_shape, model_dtype
    from sparsify.stages.bench import BenchSettings, bench

    threads = bench_threads()
    batches = tuple(int(b) for b in args.batches.split(","))
    device = torch.device(args.device)
    result = {"benchmark": "semi_structured_gpu", "device_name": device_name(device), "torch": torch.__version__,
              "dtype": args.dtype, "cuda_graph": args.cuda_graph, "threads": threads, "input_size": args.input_size, "figures": {}}
    if device.type == "cuda":
        from torch.sparse import SparseSemiStructuredTensor

        result["backend"] = "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    with tempfile.TemporaryDirectory() as runs_dir:
        for arch in args.archs.split(","):
            progress(f"{arch} 2:4: pipeline run")
            run_dir = make_run(runs_dir, arch, "2:4", input_size=args.input_size)
            progress(f"{arch} 2:4: bench on {device} in {args.dtype} at batches {batches}")
            timed = bench(run_dir, BenchSettings(device=args.device, dtype=args.dtype, batches=batches,
                                                 runs=args.repeats, cuda_graph=args.cuda_graph))
            figure = {"end_to_end": end_to_end(timed), "layers_batch": max(batches)}
            if device.type == "cuda":
                progress(f"{arch} 2:4: each layer alone at batch {max(batches)}")
                model = deploy(run_dir, device=device, batch=max(batches), calibrate=False, dtype=args.dtype).model
                example = torch.randn(input_shape({}, max(batches), args.input_size), device=device,
                                      dtype=model_dtype(args.dtype))
                try:
                    rows = layer_speedups(model, example, rounds=args.rounds, iterations=args.iterations)
                    figure["layers_alone"] = totals(rows)
                    figure["layer_rows"] = rows
                except (RuntimeError, NotImplementedError) as exc:  # keep the end-to-end figures
                    figure["layers_alone_failed"] = f"{type(exc).__name__}: {first_line(exc)[:300]}"
                del model, example
                torch.cuda.empty_cache()
            result["figures"][arch] = figure
            progress(f"{arch}: {json.dumps({k: v for k, v in figure.items() if k != 'layer_rows'})}")
            result["goals"] = goals_of(result["figures"], max(batches))
            if args.out:
                with open(args.out, "w") as handle:
                    json.dump(result, handle, indent=1)
    result["met"] = all(goal["met"] for goal in result["goals"].values()) if result.get("goals") else None
    emit(result)


if __name__ == "__main__":
    main()
