"""One train stage on every rank: loaders, model, masks, EMA, resume from the train-state, evaluate.

`finetune` is what `sparsify train` (and each training step of `run`) does between loading the
latest checkpoint and writing the next one. Every rank runs it; only rank 0 writes files.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from sparsify.io.checkpoint import describe_nonfinite, nonfinite_entries
from sparsify.io.rundir import TRAIN_STATE, RunDir
from sparsify.config import RunConfig, config_hash
from sparsify.training.distributed import (DistInfo, check_masks_agree, gather_objects, reduce_sums, run_on_every_rank,
                                           run_on_main)
from sparsify.errors import CheckpointError, SparsifyError, TrainingDiverged
from sparsify.core.masks import MaskEnforcer, find_unmasked_nonzeros
from sparsify.core.patterns import build_pattern
from sparsify.training.distill import build_distiller
from sparsify.training.loop import evaluate, train_epochs
from sparsify.training.trainer import LoopOptions, OptimConfig, Position, Trainer
from sparsify.training.log import TrainLog, drop_rows_after
from sparsify.training.state import TrainState, capture_rng, read_train_state, restore_rng, save_train_state

METRICS_CSV = "metrics.csv"


@dataclass
class Finetuned:
    """What a stage trained: the model (on CPU), the masks it ends with, its metrics."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    metrics: dict


def settings_from(section, cls):
    """A settings dataclass from the config section's keys of the same names (by keyword, never by position)."""
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.model_dump().items() if k in names}
    return cls(**values)


def optim_config(t) -> OptimConfig:
    return settings_from(t, OptimConfig)


def loop_options(t) -> LoopOptions:
    return settings_from(t, LoopOptions)


@contextmanager
def deterministic_mode(on: bool):
    """torch.use_deterministic_algorithms for the stage (restored afterwards), cudnn autotuning off."""
    before = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    if on:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = benchmark


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def check_no_drift(model: nn.Module, enforcer: MaskEnforcer, pattern, *, rank: int) -> None:
    """The drift guard on this rank: every masked weight must be exactly zero."""
    drifted = find_unmasked_nonzeros(dict(model.named_parameters()), enforcer.masks, pattern)
    if drifted:
        raise SparsifyError(f"rank {rank}: nonzero weights inside pruned groups of {drifted[0]} after training; "
                            "a callback or optimizer changed them without enforcer.apply_(); this is a bug, report it")


def check_finite(model: nn.Module, device: torch.device, *, where: str) -> None:
    """Every weight and statistic (BatchNorm running averages too) finite on every rank, else TrainingDiverged."""
    bad = nonfinite_entries(model.state_dict())
    if reduce_sums([float(len(bad))], device)[0] > 0:
        what = f"NaN or inf in {describe_nonfinite(bad)}" if bad else "NaN or inf on another rank"
        raise TrainingDiverged(f"{where}: {what} (an overflow, e.g. fp16 in BatchNorm statistics)")


def check_val_loss(metrics: dict, *, where: str) -> None:
    """A finite validation loss (the same on every rank: evaluate sums over ranks), else TrainingDiverged:
    finite weights can still overflow the activations, and such a model is not worth a checkpoint."""
    if not math.isfinite(metrics.get("val_loss", 0.0)):
        raise TrainingDiverged(f"{where}: the validation loss is {metrics['val_loss']} although every weight is "
                               "finite (the activations overflow)")


def diverged_message(exc: TrainingDiverged, *, round_: int, latest: str, lr: float, amp: str) -> str:
    """What happened, that nothing was written, and what to change."""
    fixes = f"lower train.lr (now {lr:g}), set train.clip_grad_norm"
    fixes += ", or use train.amp: bf16 instead of fp16" if amp == "fp16" else ""
    return (f"training diverged in round {round_}, {exc}; nothing was saved and the run's latest checkpoint "
            f"is still {latest}: {fixes}, then run the command again")


@contextmanager
def stops_on_divergence(*, round_: int, latest: str, lr: float, amp: str):
    """Re-raise TrainingDiverged with the round, the checkpoint that stays the latest, and the fixes."""
    try:
        yield
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_message(exc, round_=round_, latest=latest, lr=lr, amp=amp),
                               epoch=exc.epoch, step=exc.step) from None


def build_ema(ema_cfg, model: nn.Module):
    """The EMA of the weights when `train.ema` is set."""
    if ema_cfg is None:
        return None
    from sparsify.training.ema import ModelEma

    return ModelEma(model, decay=ema_cfg.decay, every=ema_cfg.every)


def make_resume(path: Path, identity: dict, info: DistInfo, *, log, csv_path: Path) -> Callable[[Trainer], Position]:
    """A function restoring a matching train-state into the trainer (fresh start otherwise)."""

    def fresh() -> Position:  # rows an earlier, unfinished attempt of this stage logged are forgotten
        run_on_main(drop_rows_after, csv_path, start=identity["start_checkpoint"], step=0)  # a failure stops every rank
        return Position()

    def resume(trainer: Trainer) -> Position:
        state = read_train_state(path, set_aside=info.is_main, log=log)
        if state is None:  # none, or a damaged one set aside
            return fresh()
        if not state.matches(**identity):
            log(f"{path.name} belongs to another stage or config; this stage starts from its beginning")
            return fresh()
        if state.world_size != info.world_size:
            raise CheckpointError(f"{path} was written by {state.world_size} process(es) and this job has "
                                  f"{info.world_size}; rerun with --nproc {state.world_size} (torchrun --nproc_per_node), "
                                  "or delete the file to start the stage again")
        trainer.model.load_state_dict(state.model)
        for name, mask in state.masks.items():
            trainer.enforcer.set_mask(name, mask)
        trainer.enforcer.apply_()
        trainer.load_parts(state.parts)
        restore_rng(state.rng[info.rank])
        run_on_main(drop_rows_after, csv_path, start=identity["start_checkpoint"], step=state.step)
        log(f"resuming from {path.name}: epoch {state.epoch + 1}/{state.epochs}, batch {state.batch}, "
            f"step {state.step}")
        return Position(state.epoch, state.batch, state.step)

    return resume


def make_saver(path: Path, identity: dict, info: DistInfo, pattern) -> Callable[[Trainer, Position], None]:
    """A function writing the train-state (RNG of every rank; rank 0 writes, the others wait)."""

    def save(trainer: Trainer, position: Position) -> None:
        rng = gather_objects(capture_rng())
        check_finite(trainer.model, trainer.device, where=f"epoch {position.epoch + 1}, step {position.step}")
        run_on_every_rank(check_no_drift, trainer.model, trainer.enforcer, pattern, rank=info.rank)
        check_masks_agree(trainer.enforcer.masks)
        counters = trainer.counters_over_ranks()
        run_on_main(lambda: save_train_state(path, TrainState(  # a failed write stops every rank
            **identity, world_size=info.world_size, epoch=position.epoch, batch=position.batch,
            step=position.step, model=trainer.model.state_dict(), masks=dict(trainer.enforcer.masks),
            parts=trainer.parts(counters), rng=rng)))

    return save


def finetune(config: RunConfig, run: RunDir, loaded, *, make_loaders: Callable[..., tuple], epochs: int,
             device: torch.device, info: DistInfo, log: Callable[[str], None], callbacks: list | tuple = ()) -> Finetuned:
    """Train the loaded checkpoint for `epochs` on this rank (resuming a matching train-state), evaluate.

    `make_loaders(seed=...)` builds this rank's (train, val) loaders for the checkpoint's model.
    """
    t, meta = config.train, loaded.checkpoint.meta
    stage_seed = config.seed + len(run.checkpoints())
    distiller = None if t.distill is None else build_distiller(  # before seeding: building draws random numbers
        run, loaded.checkpoint, teacher=t.distill.teacher, alpha=t.distill.alpha,
        temperature=t.distill.temperature, device=device, channels_last=t.channels_last, log=log)
    with deterministic_mode(t.deterministic):
        seed_everything(stage_seed + info.rank)
        train_loader, val_loader = make_loaders(seed=stage_seed)
        model = loaded.model.to(device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        pattern = loaded.pattern or build_pattern(meta["pattern"])
        enforcer = MaskEnforcer(model, loaded.masks, pattern)
        per_epoch = len(train_loader) if config.data.limit_train_batches is None else min(
            config.data.limit_train_batches, len(train_loader))
        for callback in callbacks:  # before the optimizer exists: methods may add parameters (gumbel logits)
            callback.prepare(model, enforcer, steps_per_epoch=per_epoch)
        check_masks_agree(enforcer.masks)
        identity = {"start_checkpoint": loaded.checkpoint.path.name, "start_sha256": loaded.checkpoint.sha256,
                    "config_hash": config_hash(config), "epochs": epochs}
        state_path, csv_path = run.root / TRAIN_STATE, run.root / METRICS_CSV
        train_log = TrainLog(log=log, csv_path=csv_path, round_=meta["round"], start=identity["start_checkpoint"],
                             tensorboard_dir=run.root / "tensorboard" if t.tensorboard else None)
        ema = build_ema(t.ema, model)
        with stops_on_divergence(round_=meta["round"], latest=loaded.checkpoint.path.name, lr=t.lr, amp=t.amp):
            try:
                metrics = train_epochs(
                    model, train_loader, enforcer=enforcer, cfg=optim_config(t), epochs=epochs, device=device,
                    limit=config.data.limit_train_batches, log=log, options=loop_options(t), callbacks=callbacks,
                    ema=ema, train_log=train_log, distiller=distiller,
                    resume=make_resume(state_path, identity, info, log=log, csv_path=csv_path),
                    save_state=make_saver(state_path, identity, info, pattern))
            finally:
                train_log.close()
            for callback in callbacks:  # e.g. gumbel: install the argmax masks, zero the weights under them
                callback.on_train_end(model, enforcer)
            check_finite(model, device, where=f"after {epochs} epoch(s)")
            run_on_every_rank(check_no_drift, model, enforcer, pattern, rank=info.rank)
            check_masks_agree(enforcer.masks)
            metrics.update(evaluate(model, val_loader, device=device, limit=config.data.limit_val_batches,
                                    amp=t.amp, channels_last=t.channels_last))
            check_val_loss(metrics, where=f"after {epochs} epoch(s)")
            if ema is not None:  # the checkpoint keeps the averaged weights; live_* are the last step's
                metrics.update({f"live_{k}": v for k, v in metrics.items() if k.startswith("val_")})
                ema.copy_to_(model)
                enforcer.apply_()
                check_finite(model, device, where="in the EMA weights")
                metrics.update(evaluate(model, val_loader, device=device, limit=config.data.limit_val_batches,
                                        amp=t.amp, channels_last=t.channels_last))
                check_val_loss(metrics, where="with the EMA weights")
    model = model.to(memory_format=torch.contiguous_format).cpu()
    return Finetuned(model, dict(enforcer.masks), metrics)
