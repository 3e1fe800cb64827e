"""Sparse execution at inference: each pruned Conv2d/Linear runs through an executor.

`executors` are registered classes (`base.Executor`): dense, bsr, blockgemm (seed 002's dense GEMMs
on row x column blocks), semi_structured (2:4 on CUDA). `layer.SparseLayer` wraps one layer and runs it
in mode vanilla, sparse, test, benchmark or calibrate; `calibrate` times the executors per layer and
keeps the fastest (`calibrate_model`, `apply_plan`); `load` turns a checkpoint or run folder into a
model ready for inference, reusing the calibration stored beside it; `load_compact` reads the smaller
dense model that `sparsify export --compact` writes.
"""

from sparsify.runtime.base import Executor
from sparsify.runtime.calibrate import Calibration, apply_plan, calibrate_model
from sparsify.runtime.compact import load_compact
from sparsify.runtime.layer import LayerTiming, SparseLayer, set_mode, sparse_layers
from sparsify.runtime.load import Deployed, deploy, element_masks, load

__all__ = ["Calibration", "Deployed", "Executor", "LayerTiming", "SparseLayer", "apply_plan", "calibrate_model",
           "deploy", "element_masks", "load", "load_compact", "set_mode", "sparse_layers"]
