"""`sparsify bench`: what the sparsity of a checkpoint buys, measured — time, multiply-adds and bytes.

Three models of the same architecture run the same random batch: `dense` (the run's round-0
checkpoint when there is one, else the architecture with fresh weights), `masked` (the checkpoint
run by dense kernels, as every framework runs it) and `calibrated` (each pruned layer on the executor
calibration found fastest at that batch size; see sparsify.runtime); a fourth, `compact`, when
`export --compact` would remove channels (the smaller dense model, dense kernels). Times are medians of
interleaved rounds after warm-up, with min and max. The result goes to `<run>/bench.json`.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsify.console import log
from sparsify.core.patterns import describe_pattern
from sparsify.errors import SparsifyError
from sparsify.io.files import atomic_write_bytes
from sparsify.io.restore import build_model_for, load_run
from sparsify.io.rundir import RunDir
from sparsify.runtime.calibrate import device_name
from sparsify.runtime.graphs import GraphedModel
from sparsify.runtime.layer import device_sync
from sparsify.runtime.load import deploy, input_shape, model_dtype, open_checkpoint
from sparsify.stages.costs import compaction_costs, compressed_size, layer_costs, model_costs
from sparsify.runtime.timing import interleaved_times
from sparsify.training.distributed import resolve_device

BENCH_FILE = "bench.json"
MODELS = ("dense", "masked", "calibrated", "compact")


@dataclass(kw_only=True)
class BenchSettings:
    """What to measure: the device, the dtype, the batch sizes, the input size and how many interleaved rounds."""

    device: str = "cpu"
    dtype: str = "float32"  # or float16 / bfloat16 (the semi_structured executor needs one of them on CUDA)
    cuda_graph: bool = False  # every model run (and every executor calibrated) as CUDA graph replays
    batches: tuple[int, ...] = (1, 32)
    runs: int = 7
    input_size: int | None = None
    seed: int = 0


def bench(target: Path, settings: BenchSettings) -> dict:
    """Measure the checkpoint `target` (or a run folder's latest); returns the JSON-ready result and
    writes it to the run's bench.json when the checkpoint belongs to a run folder."""
    device = resolve_device(settings.device)
    model_dtype(settings.dtype)  # a wrong name fails here, before anything is loaded
    if settings.cuda_graph and device.type != "cuda":
        raise SparsifyError(f"--cuda-graph needs --device cuda, got {device}")
    loaded, checkpoint, calibration_file = open_checkpoint(Path(target))
    run = RunDir(calibration_file.parent) if (calibration_file.parent / "history.jsonl").is_file() else None
    with run.lock("bench") if run else nullcontext():
        started = time.perf_counter()
        meta = loaded.checkpoint.meta
        dense, dense_source = dense_model(run, loaded, checkpoint)
        masked = loaded.model.eval()
        graphs = " with CUDA graphs" if settings.cuda_graph else ""
        log(f"bench: {checkpoint.name} ({meta['arch']}) on {device} in {settings.dtype}{graphs}, "
            f"batches {list(settings.batches)}, {torch.get_num_threads()} thread(s), {settings.runs} interleaved runs")
        example = torch.randn(input_shape(meta, 1, settings.input_size),
                              generator=torch.Generator().manual_seed(settings.seed))
        rows = layer_costs(masked, example)
        compact, compaction = compaction_costs(masked, example.expand(2, *example.shape[1:]))
        if compact is not None and not compaction["removed_channels"]:
            compact = None
        result = {
            "checkpoint": str(checkpoint), "arch": meta["arch"], "round": meta.get("round"),
            "pattern": describe_pattern(meta["pattern"]) if meta.get("pattern") else None,
            "environment": {**environment(device), "dtype": settings.dtype, "cuda_graph": settings.cuda_graph},
            "dense_source": dense_source,
            "input": list(example.shape[1:]), "batches": list(settings.batches),
            "costs": model_costs(masked, rows), "sizes": sizes(loaded, checkpoint),
            "end_to_end": [], "layers": [], "cost_layers": rows, "compaction": compaction,
        }
        for batch in settings.batches:
            timed, calibration = time_batch(checkpoint, meta, dense, masked, batch=batch, device=device,
                                            settings=settings, compact=compact)
            result["end_to_end"] += timed
            result["layers"] += layer_rows(calibration, batch)
        result["seconds"] = round(time.perf_counter() - started, 2)
        if run:
            atomic_write_bytes(run.root / BENCH_FILE, (json.dumps(result, indent=1) + "\n").encode())
            result["written"] = str(run.root / BENCH_FILE)
    return result


def dense_model(run: RunDir | None, loaded, checkpoint: Path) -> tuple[nn.Module, str]:
    """The dense yardstick: the run's round-0 checkpoint, else the architecture with fresh weights."""
    first = run.checkpoints()[0] if run and run.checkpoints() else None
    if first is not None and first != checkpoint:
        return load_run(run, path=first).model.eval(), first.name
    torch.manual_seed(0)
    return build_model_for(loaded.checkpoint.meta).eval(), "fresh weights (no round-0 checkpoint beside this one)"


def time_batch(checkpoint: Path, meta: dict, dense: nn.Module, masked: nn.Module, *, batch: int, device: torch.device,
               settings: BenchSettings, compact: nn.Module | None = None) -> tuple[list[dict], object]:
    """End-to-end times of the models at `batch` (compact too when given), and the calibration the
    calibrated one runs."""
    dtype = model_dtype(settings.dtype)
    deployed = deploy(checkpoint, device=device, batch=batch, input_size=settings.input_size, dtype=dtype,
                      seed=settings.seed, cuda_graph=settings.cuda_graph)
    calibration = deployed.calibration
    state = "reused from " + deployed.calibration_path.name if calibration.reused else f"{calibration.seconds:.1f} s"
    check = calibration.end_to_end
    checked = "" if not check else (f"; whole-model check: the sparse plan {check['ratio']:.3f}x dense, "
                                    f"{'kept' if check['kept'] else 'every layer back to dense'}")
    log(f"bench: batch {batch}: calibration {state}; {sum(r.chosen != 'dense' for r in calibration.layers)} of "
        f"{len(calibration.layers)} pruned layers run sparse{checked}; timing the models")
    example = torch.randn(input_shape(meta, batch, settings.input_size),
                          generator=torch.Generator().manual_seed(settings.seed)).to(device, dtype)
    models = {"dense": dense.to(device, dtype), "masked": masked.to(device, dtype), "calibrated": deployed.model}
    if compact is not None:
        models["compact"] = compact.to(device, dtype)
    if settings.cuda_graph:  # (the calibrated model comes wrapped already)
        models = {name: m if name == "calibrated" else GraphedModel(m) for name, m in models.items()}
    sync = device_sync(device)
    with torch.inference_mode():
        times = interleaved_times({name: (lambda m=m: m(example)) for name, m in models.items()},
                                  runs=settings.runs, sync=sync)
    dense_s = times["dense"]["median"]
    return [{"batch": batch, "model": name, "median_ms": round(t["median"] * 1e3, 4), "min_ms": round(t["min"] * 1e3, 4),
             "max_ms": round(t["max"] * 1e3, 4), "images_per_s": round(batch / t["median"], 2),
             "vs_dense": round(t["median"] / dense_s, 4), "runs": t["samples"]}
            for name, t in times.items()], calibration


def layer_rows(calibration, batch: int) -> list[dict]:
    """The calibration table at `batch`, with each layer's speedup of the chosen executor over dense."""
    rows = []
    for row in calibration.layers:
        dense_ms = row.ms.get("dense")
        chosen_ms = row.ms.get(row.chosen)
        rows.append({"layer": row.layer, "batch": batch, "kind": row.kind, "density": row.density,
                     "times_ms": {k: round(v, 4) for k, v in row.ms.items()}, "skipped": row.skipped,
                     "chosen": row.chosen, "why": row.why,
                     "speedup": round(dense_ms / chosen_ms, 3) if dense_ms and chosen_ms else 1.0})
    return rows


def sizes(loaded, checkpoint: Path) -> dict:
    """Bytes on disk: the checkpoint, the plain safetensors export, and that export compressed (zlib)."""
    from safetensors.torch import save

    exported = save({k: v.contiguous() for k, v in loaded.checkpoint.state.items()})
    return {"checkpoint": checkpoint.stat().st_size, "safetensors_export": len(exported),
            "safetensors_export_zlib": compressed_size(exported)}


def environment(device: torch.device) -> dict:
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def check_batches(text: str) -> tuple[int, ...]:
    """`1,32` -> (1, 32); one line when it is not a list of positive integers."""
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1 or max(batches) > 65536:
        raise SparsifyError(f"--batch {text!r} is not a list of batch sizes; give 1 to 65536 per size, e.g. --batch 1,32")
    return batches
