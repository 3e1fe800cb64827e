"""Finetune and evaluate with masks enforced (masked weights stay exactly 0.0 after every step).

One step: forward under autocast (`amp`), loss (soft targets from mixup/cutmix accepted; with a
`distiller`, the teacher's forward and the distillation term too),
backward (scaled for fp16), unscale, `enforcer.mask_grads_()`, clip, optimizer (or scaler) step,
`enforcer.apply_()`, EMA update, callbacks. Under torchrun the model is wrapped in
DistributedDataParallel and metrics are summed over ranks.

Callbacks (methods that change masks during training, sparse activations, the rewind saver)
are `sparsify.training.callbacks.TrainCallback` objects passed as `train_epochs(...,
callbacks=[...])`; that module lists their hooks and when each runs. The masks a stage ends
with are `enforcer.masks`; the stage saves those in the checkpoint.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
from torch import nn

from sparsify.core.masks import MaskEnforcer
from sparsify.errors import SparsifyError, TrainingDiverged
from sparsify.training.distributed import current_info, reduce_sums
from sparsify.training.log import StepTimer, TrainLog
from sparsify.training.trainer import (
    LoopOptions,
    NonFinite,
    OptimConfig,
    Position,
    Trainer,
    _distributed,
    autocast_for,
    count_correct,
    lr_at,
)


def to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def epoch_batches(loader, epoch: int, *, skip: int, seed: int | None) -> Iterable:
    """The loader's batches of `epoch`, after `skip` batches already done (skipped by index)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None and seed is not None:
        generator.manual_seed(seed + epoch)  # worker seeds depend on the epoch only
    if hasattr(sampler, "set_start"):
        sampler.set_start(skip * loader.batch_size)
        return loader
    import itertools

    return itertools.islice(loader, skip, None)


def train_epochs(
    model: nn.Module,
    train_loader,
    *,
    enforcer: MaskEnforcer,
    cfg: OptimConfig,
    epochs: int,
    device: torch.device,
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
    options: LoopOptions = LoopOptions(),
    callbacks: list | tuple = (),
    ema=None,
    train_log: TrainLog | None = None,
    resume: Callable[[Trainer], Position] | None = None,
    save_state: Callable[[Trainer, Position], None] | None = None,
    distiller=None,
) -> dict[str, float]:
    """Finetune for `epochs` with masks enforced; returns the last epoch's training metrics.

    `resume(trainer)` may restore a saved state and return where to continue; `save_state`
    is called every `options.save_every_steps` steps / `save_every_minutes` minutes; `distiller`
    (a training.distill.Distiller) adds its teacher's term to the loss.
    """
    trainer = Trainer(model, enforcer, cfg, options, device, list(callbacks), ema, distiller=distiller)
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_start"):
        sampler.set_start(0)
    per_epoch = len(train_loader) if limit is None else min(limit, len(train_loader))
    total = epochs * per_epoch
    seed = train_loader.generator.initial_seed() if getattr(train_loader, "generator", None) is not None else None
    enforcer.apply_()
    for callback in trainer.callbacks:
        callback.on_train_start(model, enforcer)
    position = resume(trainer) if resume else Position()
    if position.batch >= per_epoch:  # saved right after an epoch's last batch: go on with the next epoch
        position = Position(position.epoch + 1, 0, position.step)
    train_log = train_log or TrainLog(log=log)
    saver = SaveClock(options, save_state)
    global_batch = train_loader.batch_size * current_info().world_size
    metrics: dict[str, float] = {}
    with train_log.progress(total=total, done=position.step, global_batch=global_batch) as bar:
        for epoch in range(position.epoch, epochs):
            skip = position.batch if epoch == position.epoch else 0
            metrics = train_epoch(trainer, epoch_batches(train_loader, epoch, skip=skip, seed=seed),
                                  position=Position(epoch, skip, position.step), per_epoch=per_epoch, total=total,
                                  bar=bar, saver=saver, train_log=train_log)
            position = Position(epoch + 1, 0, position.step + per_epoch - skip)
            if log:
                log(f"epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f}, train top-1 "
                    f"{metrics['acc1']:.2f}%, {metrics['images_per_s']:.0f} img/s (global batch "
                    f"{global_batch}), data wait {100 * metrics['data_wait']:.0f}%")
    return metrics


class SaveClock:
    """Decides when to write the train-state: every N steps and/or every M minutes (rank 0's clock)."""

    def __init__(self, options: LoopOptions, save_state) -> None:
        self.options, self.save_state = options, save_state
        self.last = time.monotonic()

    def maybe_save(self, trainer: Trainer, position: Position, *, log_step: bool) -> None:
        if self.save_state is None:
            return
        every = self.options.save_every_steps
        due = bool(every) and position.step % every == 0
        minutes = self.options.save_every_minutes
        if not due and minutes and log_step:  # time is checked at log steps, decided by rank 0
            late = time.monotonic() - self.last >= 60 * minutes
            due = reduce_sums([1.0 if late else 0.0], trainer.device)[0] > 0 if _distributed() else late
        if due:
            self.save_state(trainer, position)
            self.last = time.monotonic()


def train_epoch(trainer: Trainer, batches: Iterable, *, position: Position, per_epoch: int, total: int,
                bar, saver: SaveClock, train_log: TrainLog) -> dict[str, float]:
    """The batches of one epoch from `position.batch` on; returns loss, top-1, img/s, data-wait share.

    Raises TrainingDiverged (naming the epoch and step) at the first step that cannot be recovered.
    """
    trainer.wrapped.train()
    device, options = trainer.device, trainer.options
    sums = trainer.epoch_sums  # loss * n, correct, n over the epoch: restored by a resume within it
    if position.batch == 0:
        sums.zero_()
    timer = StepTimer()
    batch, step = position.batch, position.step
    for images, target in batches:
        if batch >= per_epoch:
            break
        images, target = to_device(images, target, device, options.channels_last)
        timer.got_batch()
        lr = lr_at(step, total, trainer.cfg, steps_per_epoch=per_epoch)
        try:
            loss, logits, counted = trainer.step(images, target, lr=lr)
        except NonFinite as exc:
            raise TrainingDiverged(f"epoch {position.epoch + 1}, step {step + 1}: {exc}",
                                   epoch=position.epoch, step=step + 1) from None
        batch, step = batch + 1, step + 1
        trainer.after_step(step, position.epoch)
        n = len(target)
        if counted:  # an fp16 step skipped for overflow trained nothing and has no finite loss
            added = torch.stack([loss.double() * n, count_correct(logits, target).double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
            sums += added
            trainer.log_window += added
        timer.stepped(n)
        log_step = step % options.log_every == 0
        if log_step or batch == per_epoch:
            train_log.record(step=step, epoch=position.epoch, window=trainer.log_window, lr=lr, timer=timer,
                             device=device)
            trainer.log_window.zero_()
        bar.advance(step=step, lr=lr, sums=sums, timer=timer)
        saver.maybe_save(trainer, Position(position.epoch, batch, step), log_step=log_step)
    loss_sum, correct, seen = reduce_sums(sums.tolist(), device)
    images_per_s = reduce_sums([timer.images / max(timer.elapsed(), 1e-9)], device)[0]
    return {"loss": loss_sum / max(seen, 1), "acc1": 100.0 * correct / max(seen, 1),
            "images_per_s": images_per_s, "data_wait": timer.wait_share()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, limit: int | None = None,
             amp: str = "none", channels_last: bool = False) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (percent) on `loader`, summed over ranks."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    batches = len(loader) if limit is None else min(limit, len(loader))
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, seen
    for index, (images, target) in enumerate(loader):
        if index == batches:
            break
        images, target = to_device(images, target, device, channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += float(criterion(logits, target))
        sums[1] += int((best[:, 0] == target).sum())
        sums[2] += int((best == target[:, None]).any(1).sum())
        sums[3] += len(target)
    loss_sum, top1, top5, seen = reduce_sums(sums, device)
    if seen == 0:
        raise SparsifyError("the validation set is empty; check data.root and data.limit_val_batches")
    return {"val_loss": loss_sum / seen, "val_acc1": 100.0 * top1 / seen, "val_acc5": 100.0 * top5 / seen}
