"""load(): a checkpoint (or a run folder's latest one) as a model ready for inference, each pruned layer
running its fastest executor, the calibration kept next to the checkpoint for the next load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.io.checkpoint import load_checkpoint
from sparsify.io.restore import LoadedRun, load_run, rebuild
from sparsify.io.rundir import RunDir
from sparsify.registry import EXECUTORS
from sparsify.runtime.calibrate import (
    Calibration, apply_plan, calibrate_model, calibration_key, read_calibration,
    write_calibration,
)
from sparsify.runtime.graphs import GraphedModel
from sparsify.runtime.layer import unwrap_dense, wrap_layers

CALIBRATION_FILE = "calibration.json"


@dataclass
class Deployed:
    """A model ready for inference and what made it: the checkpoint, its calibration and where that is kept."""

    model: nn.Module
    checkpoint: Path
    calibration: Calibration | None
    calibration_path: Path


def load(path: str | Path, device: str | torch.device = "cpu", batch: int = 1, calibrate: bool = True,
         input_size: int | None = None, dtype: str | torch.dtype | None = None, **options) -> nn.Module:
    """The model of checkpoint `path` (or of a run folder's latest checkpoint) in eval mode, masked, each
    pruned layer a SparseLayer running the executor calibration found fastest at `batch` x `input_size`;
    a layer calibration keeps dense is the plain masked layer again (no wrapper, no cost).

    `dtype` (float32, float16 or bfloat16; default the checkpoint's float32) casts the model; inputs
    must then have that dtype. `calibrate=False` runs every layer dense; other options are those of
    `deploy`.
    """
    return deploy(path, device=device, batch=batch, calibrate=calibrate, input_size=input_size, dtype=dtype,
                  **options).model


def deploy(path: str | Path, *, device: str | torch.device = "cpu", batch: int = 1, calibrate: bool = True,
           input_size: int | None = None, dtype: str | torch.dtype | None = None, executor: str | None = None,
           reuse: bool = True, repeats: int = 15, budget_s: float = 0.2, margin: float = 0.03,
           seed: int = 0, cuda_graph: bool = False) -> Deployed:
    """`load`, returning the calibration table too (`Deployed`).

    `executor` runs that executor wherever it applies (dense elsewhere) instead of calibrating;
    `reuse=False` times again even when the calibration file holds this key; `repeats`, `budget_s`
    and `margin` are those of `calibrate_model`; `seed` makes the random calibration input.
    `cuda_graph` (CUDA only) times the executors as CUDA graph replays and returns the model wrapped in
    a `GraphedModel`, which captures one graph per input shape and replays it.
    """
    if batch < 1:
        raise SparsifyError(f"batch must be at least 1, got {batch}")
    device = torch.device(device)
    if cuda_graph and device.type != "cuda":
        raise SparsifyError(f"cuda_graph needs a CUDA device, got {device}; give device='cuda' or leave cuda_graph off")
    deployed = place(path, device=device, batch=batch, calibrate=calibrate, input_size=input_size, dtype=dtype,
                     executor=executor, reuse=reuse, repeats=repeats, budget_s=budget_s, margin=margin, seed=seed,
                     graphs=cuda_graph)
    if cuda_graph:
        deployed.model = GraphedModel(deployed.model)
    return deployed


def place(path, *, device: torch.device, batch: int, calibrate: bool, input_size: int | None, dtype,
          executor: str | None, reuse: bool, repeats: int, budget_s: float, margin: float, seed: int,
          graphs: bool) -> Deployed:
    """`deploy` without the graph wrapper: load, cast, mask, then the forced, dense or calibrated plan."""
    loaded, checkpoint, store = open_checkpoint(Path(path))
    run_dtype = model_dtype(dtype)
    model = loaded.model.eval().to(device, run_dtype)
    masks = element_masks(loaded, model)
    if executor is not None:
        apply_plan(model, masks, forced_plan(model, masks, executor))
        return Deployed(model, checkpoint, None, store)
    if not calibrate:
        apply_plan(model, masks, {})
        return Deployed(model, checkpoint, None, store)
    shape = input_shape(loaded.checkpoint.meta, batch, input_size)
    key = calibration_key(device=device, input_shape=shape, dtype=run_dtype, checkpoint=loaded.checkpoint.sha256,
                          graphs=graphs)
    stored = read_calibration(store, key) if reuse else None
    if stored is not None and set(stored.plan) == set(wrap_layers(model, masks)):
        apply_plan(model, masks, stored)
        unwrap_dense(model)
        return Deployed(model, checkpoint, stored, store)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, run_dtype)
    calibration = calibrate_model(model, masks, example, repeats=repeats, budget_s=budget_s, margin=margin,
                                  checkpoint=loaded.checkpoint.sha256, graphs=graphs)
    calibration.key = key
    write_calibration(store, calibration)
    unwrap_dense(model)
    return Deployed(model, checkpoint, calibration, store)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype a model is run in: float32 (None), float16 or bfloat16, by name or as a torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise SparsifyError(f"dtype {dtype!r} is not one sparsify runs models in; give one of {', '.join(DTYPES)}")


def open_checkpoint(path: Path) -> tuple[LoadedRun, Path, Path]:
    """The loaded checkpoint, its path and the calibration file beside it.

    A run folder gives its latest checkpoint and `<run>/calibration.json`; a checkpoint inside a run
    folder's checkpoints/ is checked against the run's history and shares that file; any other
    checkpoint file `x.safetensors` keeps its calibration in `x.calibration.json`.
    """
    if path.is_dir():
        run = RunDir(path)
        loaded = load_run(run)
        return loaded, loaded.checkpoint.path, path / CALIBRATION_FILE
    if not path.is_file():
        raise SparsifyError(f"{path} is neither a checkpoint file nor a run folder; give runs/<name> or one of its "
                            "checkpoints/*.safetensors")
    if path.parent.name == "checkpoints" and (path.parent.parent / "history.jsonl").is_file():
        run = RunDir(path.parent.parent)
        return load_run(run, path=path), path, run.root / CALIBRATION_FILE
    return rebuild(load_checkpoint(path)), path, path.with_suffix(".calibration.json")


def element_masks(loaded: LoadedRun, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's group masks expanded to weight-shaped element masks."""
    params = dict(model.named_parameters())
    return {name: loaded.pattern.expand(mask, tuple(params[name].shape)) for name, mask in loaded.masks.items()}


def input_shape(meta: dict, batch: int, input_size: int | None) -> tuple[int, int, int, int]:
    """(batch, in_channels, size, size): the given size, else the checkpoint's input size, else 224."""
    size = input_size or meta.get("input_size") or 224
    if size < 1:
        raise SparsifyError(f"input_size must be at least 1, got {size}")
    return batch, int(meta.get("in_channels") or 3), int(size), int(size)


def forced_plan(model: nn.Module, masks: dict[str, torch.Tensor], name: str) -> dict[str, str]:
    """Executor `name` on every layer it applies to, dense on the others."""
    executor = EXECUTORS.get(name)()
    layers = wrap_layers(model, masks)
    return {layer: name if layer_obj.reason(executor) is None else "dense" for layer, layer_obj in layers.items()}
