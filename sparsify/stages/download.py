"""`sparsify download`: round 0, the model with its starting weights."""

from __future__ import annotations

import time

import torch

from sparsify.config import RunConfig
from sparsify.console import log
from sparsify.data.datasets import check_data
from sparsify.errors import ModelError, SparsifyError
from sparsify.io.rundir import TRAIN_STATE, RunDir
from sparsify.io.sensitivity import SENSITIVITY_FILE
from sparsify.models.build import build_model, input_size_problem
from sparsify.stages.run import StageResult, resolve_shapes, save_resolved_config, write_stage
from sparsify.training.distributed import resolve_device
from sparsify.training.stage import METRICS_CSV


def download(config: RunConfig, *, force: bool = False) -> StageResult:
    """Round 0: build the model with its starting weights and save it."""
    run = RunDir(config.run_dir)
    if run.checkpoints() and not force:
        raise already_started(run)
    started = time.perf_counter()
    resolve_device(config.device)  # a device that is not there is refused before anything is written
    check_data(config.data, num_classes=config.model.num_classes)  # what train would refuse, before anything is written
    shapes = resolve_shapes(config)
    problem = input_size_problem(config.model.arch, num_classes=shapes["num_classes"], in_channels=shapes["in_channels"],
                                 input_size=shapes["input_size"])
    if problem:
        raise ModelError(problem)
    torch.manual_seed(config.seed)  # random initial weights (and new heads) repeat with the seed
    model = build_model(config.model.arch, num_classes=shapes["num_classes"], in_channels=shapes["in_channels"],
                        weights=config.model.weights, log=log)
    with run.lock("download", create=True):
        if run.checkpoints() and not force:  # again under the lock: another download may have written one since
            raise already_started(run)
        result = write_stage(run, config, command="download", parent=None, model=model, masks={},
                             round_=0, stage="pretrained", metrics={}, started=started,
                             extra_meta={**shapes, "arch": config.model.arch, "weights": config.model.weights},
                             replacing=(lambda: start_again(run)) if force else None)
        save_resolved_config(run, config)
    result.message = f"round 0: {config.model.arch} saved to {result.checkpoint}"
    return result


def already_started(run: RunDir) -> SparsifyError:
    return SparsifyError(f"run folder {run.root} already has checkpoints; pass --force to start it again "
                         f"(the old checkpoints are deleted) or choose another name:")


def start_again(run: RunDir) -> None:
    """--force: the newest checkpoint first (a kill part-way leaves an older run that still resumes), then the
    history and what the old stages left beside them (train-state, metrics.csv, sensitivity.json)."""
    old = [*reversed(run.checkpoints()), *(run.root / name for name in (TRAIN_STATE, METRICS_CSV, SENSITIVITY_FILE)),
           run.history_path]
    for path in old:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise SparsifyError(f"download --force could not delete {path} ({exc.strerror or exc}); the files "
                                "before it in that order are deleted, the rest are as they were: fix that and run "
                                "download --force again") from None
