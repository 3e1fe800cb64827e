"""Finetune and evaluate with masks enforced (masked weights stay exactly 0.0 after every step).

One step: forward under autocast (`amp`), loss (soft targets from mixup/cutmix accepted),
backward (scaled for fp16), unscale, `enforcer.mask_grads_()`, clip, optimizer (or scaler) step,
`enforcer.apply_()`, EMA update, callbacks. Under torchrun the model is wrapped in
DistributedDataParallel and metrics are summed over ranks.

Callbacks (methods that change masks during training, sparse activations, the rewind saver)
are `sparsify.training.callbacks.TrainCallback` objects passed as `train_epochs(...,
callbacks=[...])`; that module lists their hooks and when each runs. The masks a stage ends
with are `enforcer.masks`; the stage saves those in the checkpoint.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from sparsify.training.distributed import current_info, reduce_sums
from sparsify.errors import SparsifyError, TrainingDiverged
from sparsify.core.masks import MaskEnforcer
from sparsify.training.log import StepTimer, TrainLog

AUX_LOSS_WEIGHT = 0.4  # inception_v3 / googlenet auxiliary heads, as in torchvision's references
GIVE_UP_SCALE = 1.0  # fp16: a step skipped at this loss scale or below overflows even unscaled


class NonFinite(Exception):
    """A step produced a loss (or fp16 gradients) that training cannot recover from."""


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and LR schedule of one train stage."""

    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine | step
    lr_steps: tuple[int, ...] = ()  # step: epochs of the stage where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # wins over warmup_epochs


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs: precision, memory format, compilation, regularisation, logging, saving."""

    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    log_every: int = 50
    save_every_steps: int | None = None
    save_every_minutes: float | None = None


@dataclass
class Position:
    """Where a stage stands: epoch in progress, its batches done, optimizer steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0




def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise SparsifyError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def warmup_length(cfg: OptimConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return round(cfg.warmup_epochs * steps_per_epoch)


def lr_at(step: int, total_steps: int, cfg: OptimConfig, *, steps_per_epoch: int = 1) -> float:
    """LR for 0-based `step` of `total_steps` within one train stage (linear warmup, then the schedule)."""
    warmup = min(warmup_length(cfg, steps_per_epoch), total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "cosine" and total_steps - warmup > 1:
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))
    if cfg.lr_schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return cfg.lr * cfg.lr_gamma ** sum(1 for milestone in cfg.lr_steps if epoch >= milestone)
    return cfg.lr


def classification_loss(output, target: torch.Tensor, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and main logits; auxiliary heads (inception, googlenet) add AUX_LOSS_WEIGHT each."""
    if isinstance(output, torch.Tensor):
        return criterion(output, target), output
    logits = output.logits
    loss = criterion(logits, target)
    for name in ("aux_logits", "aux_logits1", "aux_logits2"):
        aux = getattr(output, name, None)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * criterion(aux, target)
    return loss, logits


def count_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 hits; soft targets (N, C) from mixup/cutmix count against their argmax."""
    labels = target.argmax(1) if target.ndim == 2 else target
    return (logits.argmax(1) == labels).sum()


def autocast_for(device: torch.device, amp: str):
    """torch.autocast for `amp` (bf16 | fp16) on the device, or a no-op for none."""
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise SparsifyError(f"unknown train.amp {amp!r}; choose none, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 (gradients would underflow without it); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def wrap_model(model: nn.Module, device: torch.device, options: LoopOptions) -> nn.Module:
    """The module the loop calls: DDP under torchrun, then torch.compile when asked."""
    import torch.distributed as dist

    wrapped = model
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if options.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


@dataclass
class Trainer:
    """The live objects of one train stage and the step that moves them."""

    model: nn.Module  # the plain module (its state_dict has no DDP/compile prefixes)
    enforcer: MaskEnforcer
    cfg: OptimConfig
    options: LoopOptions
    device: torch.device
    callbacks: list = field(default_factory=list)
    ema: object | None = None
    log_window: torch.Tensor | None = None  # loss * n, correct, n since the last metrics row
    wrapped: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: object | None = None

    def __post_init__(self) -> None:
        self.wrapped = wrap_model(self.model, self.device, self.options)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scaler = make_scaler(self.device, self.options.amp)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.options.label_smoothing)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.log_window = torch.zeros(3, dtype=torch.float64, device=self.device)

    def step(self, images: torch.Tensor, target: torch.Tensor, *, lr: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step with masks exact; returns the (detached) loss, the logits and
        whether the step counts (False: fp16 skipped it for non-finite gradients).

        Raises NonFinite, before any weight changes, when the loss is not finite on some rank
        (without a GradScaler), or when fp16 still overflows at a loss scale of GIVE_UP_SCALE.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(self.device, self.options.amp):
            loss, logits = classification_loss(self.wrapped(images), target, self.criterion)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            if not finite_on_every_rank(loss):
                raise NonFinite(f"the training loss is {describe_value(loss)}")
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        self.enforcer.mask_grads_()
        if self.options.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.options.clip_grad_norm)
        counted = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            counted = self.scaler.get_scale() >= scale  # the scale shrinks exactly when the step was skipped
            if not counted and scale <= GIVE_UP_SCALE:
                raise NonFinite(f"fp16 gradients overflow even at loss scale {scale:g} (loss {describe_value(loss)})")
        else:
            self.optimizer.step()
        self.enforcer.apply_()
        return loss.detach(), logits.detach(), counted

    def after_step(self, step: int, epoch: int) -> None:
        """EMA update, then the callbacks' hook (masks already applied)."""
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        for callback in self.callbacks:
            callback.after_step(step, epoch, self.model, self.enforcer)

    def parts(self) -> dict:
        """Nested state of everything besides weights and masks (for the train-state)."""
        parts = {"optimizer": self.optimizer.state_dict(),
                 "callbacks": [callback.state_dict() for callback in self.callbacks],
                 "log_window": self.log_window.clone()}
        if self.scaler is not None:
            parts["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            parts["ema"] = self.ema.state_dict()
        return parts

    def load_parts(self, parts: dict) -> None:
        """Put back what `parts` returned."""
        self.optimizer.load_state_dict(parts["optimizer"])
        for callback, state in zip(self.callbacks, parts.get("callbacks", [])):
            if state is not None:
                callback.load_state_dict(state)
        if self.scaler is not None and "scaler" in parts:
            self.scaler.load_state_dict(parts["scaler"])
        if self.ema is not None and "ema" in parts:
            self.ema.load_state_dict(parts["ema"])
        if "log_window" in parts:  # train-states written before the window was saved lack it
            self.log_window.copy_(parts["log_window"])


def finite_on_every_rank(value: torch.Tensor) -> bool:
    """True when `value` is finite on this rank and every other (one all-reduce under torchrun)."""
    bad = (~torch.isfinite(value.detach())).any().to(torch.float64).reshape(1)
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(bad)
    return bool(bad.item() == 0)


def describe_value(value: torch.Tensor) -> str:
    """'nan', 'inf' or the number (for error messages)."""
    number = float(value.detach().float())
    return "nan" if math.isnan(number) else ("inf" if math.isinf(number) else f"{number:g}")


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
) -> dict[str, float]:
    """Finetune for `epochs` with masks enforced; returns the last epoch's training metrics.

    `resume(trainer)` may restore a saved state and return where to continue; `save_state`
    is called every `options.save_every_steps` steps / `save_every_minutes` minutes.
    """
    trainer = Trainer(model, enforcer, cfg, options, device, list(callbacks), ema)
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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def train_epoch(trainer: Trainer, batches: Iterable, *, position: Position, per_epoch: int, total: int,
                bar, saver: SaveClock, train_log: TrainLog) -> dict[str, float]:
    """The batches of one epoch from `position.batch` on; returns loss, top-1, img/s, data-wait share.

    Raises TrainingDiverged (naming the epoch and step) at the first step that cannot be recovered.
    """
    trainer.wrapped.train()
    device, options = trainer.device, trainer.options
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n over the epoch
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
