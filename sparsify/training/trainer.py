"""One optimizer step with masks exact (Trainer), the settings of a stage's optimizer and loop, and
the checks that stop a diverging run."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from sparsify.core.masks import MaskEnforcer
from sparsify.errors import SparsifyError
from sparsify.training.distributed import current_info, reduce_sums

if TYPE_CHECKING:
    from sparsify.training.distill import Distiller

AUX_LOSS_WEIGHT = 0.4  # inception_v3 / googlenet auxiliary heads, as in torchvision's references
GIVE_UP_SCALE = 1.0  # fp16: a step skipped at this loss scale or below overflows even unscaled
COUNTERS = ("log_window", "epoch_sums")  # the Trainer's running (loss * n, correct, n) sums kept in a train-state


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


def classification_loss(output, target: torch.Tensor, criterion: nn.Module, *,
                        blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and main logits; auxiliary heads (inception, googlenet) add AUX_LOSS_WEIGHT each.

    `blend(logits, ce)`, when given, turns the main logits' cross-entropy into the main term
    (distillation); the auxiliary heads keep their cross-entropy.
    """
    logits = output if isinstance(output, torch.Tensor) else output.logits
    loss = criterion(logits, target)
    if blend is not None:
        loss = blend(logits, loss)
    if isinstance(output, torch.Tensor):
        return loss, logits
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
    distiller: Distiller | None = None  # knowledge distillation: a frozen teacher blended into the loss
    log_window: torch.Tensor | None = None  # loss * n, correct, n since the last metrics row (this rank)
    epoch_sums: torch.Tensor | None = None  # loss * n, correct, n since the epoch began (this rank)
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
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def step(self, images: torch.Tensor, target: torch.Tensor, *, lr: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step with masks exact; returns the (detached) loss, the logits and
        whether the step counts (False: fp16 skipped it for non-finite gradients).

        Raises NonFinite, before any weight changes, when the loss is not finite on some rank
        (without a GradScaler), or when fp16 still overflows at a loss scale of GIVE_UP_SCALE.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(self.device, self.options.amp):
            output = self.wrapped(images)
            blend = None
            if self.distiller is not None:  # the teacher's forward under no_grad, in eval mode
                blend = partial(self.distiller.blend, self.distiller.teacher_logits(images))
            loss, logits = classification_loss(output, target, self.criterion, blend=blend)
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

    def counters_over_ranks(self) -> dict:
        """The metrics window and the epoch's sums, summed over ranks (every rank calls this) for the train-state:
        a resumed epoch's loss and top-1 then cover the batches before the resume too."""
        return {name: torch.tensor(reduce_sums(getattr(self, name).tolist(), self.device), dtype=torch.float64)
                for name in COUNTERS}

    def parts(self, counters: dict) -> dict:
        """Nested state of everything besides weights and masks (for the train-state); `counters`: from
        `counters_over_ranks`."""
        parts = {"optimizer": self.optimizer.state_dict(),
                 "callbacks": [callback.state_dict() for callback in self.callbacks], **counters}
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
        first = current_info().rank == 0
        for name in COUNTERS:  # totals over ranks: rank 0 carries them, the others start from zero
            if name in parts:  # train-states written before these counters were saved lack them
                getattr(self, name).copy_(parts[name] if first else torch.zeros_like(parts[name]))


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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
