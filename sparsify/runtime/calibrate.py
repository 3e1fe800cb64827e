"""Calibration: time every executor on every pruned layer at one batch size and input shape, keep the
fastest per layer, and keep the result in a JSON file so the next load with the same key reuses it.

The key is the device's name, the torch version, the CPU thread count, the dtype, the batch size,
the input shape and the checkpoint's sha256: a result is reused only where it was measured.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsify.console import log
from sparsify.errors import SparsifyError
from sparsify.io.files import atomic_write_bytes
from sparsify.runtime.graphs import capture
from sparsify.runtime.layer import LayerTiming, SparseLayer, device_sync, set_mode, wrap_layers
from sparsify.runtime.timing import TimingSettings, interleaved_times

FILE_FORMAT = 1


@dataclass
class Calibration:
    """Per-layer timings and choices of one calibration, and the key it is valid for."""

    key: dict
    layers: list[LayerTiming] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False  # read back from the calibration file, not timed now
    end_to_end: dict | None = None  # the whole-model check of the plan (see `check_end_to_end`)

    @property
    def plan(self) -> dict[str, str]:
        """Layer name -> chosen executor."""
        return {row.layer: row.chosen for row in self.layers}

    def rows(self) -> list[dict]:
        """The table as plain dicts (layer, kind, weight, input, density, ms, skipped, chosen, why, repeats)."""
        return [asdict(row) for row in self.layers]

    def to_json(self) -> dict:
        return {"key": self.key, "seconds": round(self.seconds, 3), "layers": self.rows(), "end_to_end": self.end_to_end}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(data["key"], [LayerTiming(**row) for row in data["layers"]], float(data["seconds"]), reused=True,
                   end_to_end=data.get("end_to_end"))


def device_name(device: torch.device) -> str:
    """The accelerator's or CPU's model name (what the timings belong to)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def calibration_key(*, device: torch.device, input_shape: tuple[int, ...], dtype: torch.dtype,
                    checkpoint: str = "", graphs: bool = False) -> dict:
    """What a calibration depends on; a stored one is reused only when all of it matches."""
    key = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "dtype": str(dtype).removeprefix("torch."), "batch": int(input_shape[0]),
           "input": [int(s) for s in input_shape], "checkpoint": checkpoint}
    return {**key, "cuda_graph": True} if graphs else key


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def calibrate_model(model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor, *,
                    device: torch.device | str | None = None, repeats: int = 15, budget_s: float = 0.2,
                    margin: float = 0.03, executors: list[str] | None = None, checkpoint: str = "",
                    graphs: bool = False, check_rounds: int = 1) -> Calibration:
    """Wrap the masked layers of `model` (in place), time every executor on each at `example_input`'s shape
    (one forward pass, each layer on its real input) and keep the fastest; returns the table.

    `masks` are element masks keyed by parameter name (see `element_masks`); `repeats` caps the timed
    rounds per layer, `budget_s` is the time after which a layer stops at its third round, `margin` the
    share by which an executor must beat dense to replace it; `executors` limits the candidates;
    `graphs` times each candidate as a CUDA graph replay (for a model that will run in a CUDA graph);
    `check_rounds` > 0 then times the whole model with the plan against all layers dense
    (`check_end_to_end`, one forward pass of each per round) and keeps the plan only where it is not
    slower.
    """
    if device is not None:
        model.to(device)
    device, dtype = model_device_dtype(model)
    example_input = example_input.to(device)
    settings = TimingSettings(budget_s=budget_s, max_repeats=max(1, repeats), min_repeats=min(3, max(1, repeats)),
                              margin=margin, graphs=graphs)
    layers = wrap_layers(model, masks)
    model.eval()
    for layer in layers.values():
        layer.settings, layer.candidates, layer.timing = settings, tuple(executors) if executors else None, None
    set_mode(model, "calibrate")
    started = time.perf_counter()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        set_mode(model, "sparse")
    rows = [layer.timing or unreached(name, layer) for name, layer in layers.items()]
    key = calibration_key(device=device, input_shape=tuple(example_input.shape), dtype=dtype, checkpoint=checkpoint,
                          graphs=graphs)
    checked = check_end_to_end(model, layers, rows, example_input, rounds=check_rounds, graphs=graphs)
    return Calibration(key, rows, time.perf_counter() - started, end_to_end=checked)


def check_end_to_end(model: nn.Module, layers: dict[str, SparseLayer], rows: list[LayerTiming], example: torch.Tensor,
                     *, rounds: int, graphs: bool = False) -> dict | None:
    """Time the whole model with the calibrated plan ("sparse" mode) against every layer dense ("vanilla" mode),
    `rounds` interleaved; where the plan is slower, every layer goes back to dense and each row says why.

    Layers timed alone do not always add up: a sparse layer can leave its output in a layout the next
    layer reads slowly, or a GPU can overlap the dense kernels better. None when no layer runs sparse.
    """
    if rounds < 1 or all(row.chosen == "dense" for row in rows):
        return None
    runs = {}
    for mode in ("sparse", "vanilla"):
        if graphs and example.is_cuda:  # each mode's kernels recorded once, replayed when timed
            set_mode(model, mode)
            runs[mode] = capture(model, example, warmup=1).graph.replay
        else:
            runs[mode] = mode_call(model, mode, example)
    with torch.no_grad():  # (calibration has just run every layer: no warm-up)
        times = whole_model_times(runs, rounds=rounds, sync=device_sync(example.device))
    set_mode(model, "sparse")
    ratio = times["sparse"] / times["vanilla"]
    kept = ratio <= 1.0
    if not kept:
        for row in rows:
            if row.chosen != "dense":
                row.why = (f"{row.chosen} was faster alone, but the whole model with the sparse plan took "
                           f"{ratio:.3f}x the dense model: every layer dense")
                row.chosen = "dense"
                layers[row.layer].use("dense")
    return {"sparse_ms": round(times["sparse"] * 1e3, 4), "dense_ms": round(times["vanilla"] * 1e3, 4),
            "ratio": round(ratio, 4), "rounds": rounds, "kept": kept}


def whole_model_times(runs: dict, *, rounds: int, sync) -> dict[str, float]:
    """Median seconds of one call of each run over `rounds` rounds, the order alternating, no warm-up call."""
    times = interleaved_times(runs, runs=rounds, warmup=0, min_sample_s=0.0, sync=sync)
    return {name: figures["median"] for name, figures in times.items()}


def mode_call(model: nn.Module, mode: str, example: torch.Tensor):
    """One eager forward pass of `model` with every SparseLayer in `mode`."""
    def call():
        set_mode(model, mode)
        return model(example)
    return call


def unreached(name: str, layer: SparseLayer) -> LayerTiming:
    """The row of a layer the forward pass never called: it stays dense."""
    return LayerTiming(name, layer.kind, list(layer.weight.shape), [], round(float(layer.mask.float().mean()), 6),
                       why="not called by the forward pass: stays dense")


def apply_plan(model: nn.Module, masks: dict[str, torch.Tensor], plan: dict[str, str] | Calibration
               ) -> dict[str, SparseLayer]:
    """Wrap the masked layers of `model` (in place) and run each with the executor `plan` names (dense if none)."""
    plan = plan.plan if isinstance(plan, Calibration) else plan
    layers = wrap_layers(model, masks)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise SparsifyError(f"the plan names layer {unknown[0]!r}, which has no mask in this model")
    for name, layer in layers.items():
        layer.use(plan.get(name, "dense"))
        layer.mode = "sparse"
    model.eval()
    return layers


def read_calibration(path: Path, key: dict) -> Calibration | None:
    """The stored calibration for `key`, or None (no file, no such key, or a file that is not ours)."""
    for entry in stored_entries(path):
        if entry.get("key") == key:
            try:
                return Calibration.from_json(entry)
            except (KeyError, TypeError, ValueError):
                log(f"{path}: the entry for this key is damaged; calibrating again")
                return None
    return None


def stored_entries(path: Path) -> list[dict]:
    """The entries of a calibration file ([] when there is none or it cannot be read as one)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log(f"{path} is not a readable calibration file ({type(exc).__name__}); it will be rewritten")
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def write_calibration(path: Path, calibration: Calibration) -> None:
    """Add `calibration` to the file at `path` (replacing an entry with the same key), atomically."""
    entries = [e for e in stored_entries(path) if e.get("key") != calibration.key]
    entries.append(calibration.to_json())
    text = json.dumps({"format": FILE_FORMAT, "entries": entries}, indent=1)
    atomic_write_bytes(Path(path), (text + "\n").encode())
