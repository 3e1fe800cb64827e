"""`sparsify train`: finetune the latest checkpoint with masks enforced, on every torchrun rank."""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial

import torch

from sparsify.config import RunConfig
from sparsify.console import log
from sparsify.io.checkpoint import Checkpoint
from sparsify.io.rundir import RunDir
from sparsify.io.restore import load_run
from sparsify.methods.activations import activation_callbacks
from sparsify.methods.base import callbacks_for, stage_meta, stage_tensors
from sparsify.rounds.rewind import rewind_callbacks
from sparsify.stages.run import StageResult, check_same_run, checkpoint_loaders, save_resolved_config, write_stage
from sparsify.training.distributed import (distributed_session, fails_together, main_holds, run_on_every_rank,
                                           run_on_main)
from sparsify.training.stage import METRICS_CSV, TRAIN_STATE, finetune


def train(config: RunConfig, *, epochs: int | None = None, stage: str = "trained", command: str = "train") -> StageResult:
    """Finetune the latest checkpoint with masks enforced, evaluate, save (on every torchrun rank)."""
    with distributed_session(config.device) as (info, device):
        run = RunDir(config.run_dir)
        with main_holds(run.lock(command)):
            started = time.perf_counter()
            with fails_together():  # every rank loads the checkpoint: a rank that cannot stops them all
                loaded = load_run(run)
                meta = loaded.checkpoint.meta
                check_same_run(config, meta)
                n_epochs = epochs or config.train.epochs
                log(f"{command}: round {meta['round']}, {n_epochs} epoch(s) on {device}"
                    f"{f' x {info.world_size} processes' if info.active else ''}, {len(loaded.masks)} masked "
                    f"layers, {torch.get_num_threads()} CPU thread(s)")
                callbacks = callbacks_for(config, loaded.model, parent_meta=meta, extra={
                    "trainable": config.train.trainable, "parent_tensors": loaded.checkpoint.extra})
                callbacks += activation_callbacks(config.activations, seed=config.seed)
                callbacks += rewind_callbacks(config, run, loaded.checkpoint)  # rewind: {epoch: E} saves in round 0
            make_loaders = partial(run_on_every_rank, partial(  # a rank whose data fails stops them all
                checkpoint_loaders, config, meta, pin_memory=device.type == "cuda", rank=info.rank,
                world_size=info.world_size))
            with forgets_rows_if_failed(run, loaded.checkpoint, main=info.is_main):
                done = finetune(config, run, loaded, make_loaders=make_loaders, epochs=n_epochs, device=device,
                                info=info, log=log, callbacks=callbacks)
                metrics = {k: round(v, 4) for k, v in done.metrics.items()}
                metrics["epochs"] = n_epochs
                result = run_on_main(write_trained, run, config, command=command, parent=loaded.checkpoint,
                                     done=done, metrics=metrics, stage=stage, started=started,
                                     extra_meta=stage_meta(callbacks), extra_tensors=stage_tensors(callbacks))
    result.message = (f"round {result.round} {stage}: val top-1 {metrics['val_acc1']:.2f}%, "
                      f"top-5 {metrics['val_acc5']:.2f}%, sparsity {result.sparsity:.2%}")
    return result


@contextmanager
def forgets_rows_if_failed(run: RunDir, start: Checkpoint, *, main: bool):
    """A train stage that fails leaves metrics.csv as it found it, but for the rows a train-state covers.

    The next attempt starts the stage again (or resumes it from the train-state, whose rows stay);
    a file the failed stage created and left without rows is removed.
    """
    csv_path = run.root / METRICS_CSV
    existed = csv_path.is_file()
    try:
        yield
    except BaseException:
        if main and csv_path.is_file():
            from sparsify.training.log import drop_rows_after, read_rows

            drop_rows_after(csv_path, start=start.path.name, step=resumable_step(run, start))
            if not existed and not read_rows(csv_path):
                csv_path.unlink()
        raise


def resumable_step(run: RunDir, start: Checkpoint) -> int:
    """The step of the train-state a rerun of the stage from `start` may resume from (0: none)."""
    import json

    from sparsify.io.checkpoint import read_metadata
    path = run.root / TRAIN_STATE
    if not path.is_file():
        return 0
    try:
        meta = {key: json.loads(value) for key, value in read_metadata(path).items()}
    except Exception:  # a damaged train-state resumes nothing
        return 0
    if (meta.get("start_checkpoint"), meta.get("start_sha256")) != (start.path.name, start.sha256):
        return 0
    return int(meta.get("step") or 0)


def write_trained(run: RunDir, config: RunConfig, *, command: str, parent: Checkpoint, done, metrics: dict,
                  stage: str, started: float, extra_meta: dict | None = None,
                  extra_tensors: dict | None = None) -> StageResult:
    """Rank 0: the trained checkpoint (with the masks training ended with), then drop the train-state."""
    result = write_stage(run, config, command=command, parent=parent, model=done.model, masks=done.masks,
                         round_=parent.meta["round"], stage=stage, metrics=metrics, started=started,
                         extra_meta=extra_meta, extra_tensors=extra_tensors)
    save_resolved_config(run, config)  # only a stage that succeeded changes the run's config.yaml
    (run.root / TRAIN_STATE).unlink(missing_ok=True)
    return result
