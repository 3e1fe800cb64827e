"""Finetune and evaluate with masks enforced (masked weights stay exactly 0.0 after every step)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sparsify.errors import SparsifyError
from sparsify.masks import MaskEnforcer

AUX_LOSS_WEIGHT = 0.4  # inception_v3 / googlenet auxiliary heads, as in torchvision's references


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and LR schedule of one train stage."""

    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "constant"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparsifyError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise SparsifyError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for `step` of `total_steps` within one train stage."""
    if cfg.lr_schedule == "cosine" and total_steps > 1:
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total_steps))
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


def _limited(loader: Iterable, limit: int | None) -> tuple[Iterable, int]:
    total = len(loader) if limit is None else min(limit, len(loader))
    return loader, total


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not sys.stderr.isatty(),
    )


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    enforcer: MaskEnforcer,
    cfg: OptimConfig,
    device: torch.device,
    step_offset: int,
    total_steps: int,
    limit: int | None,
    progress: Progress,
    description: str,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, top-1 and images per second."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    loader, batches = _limited(loader, limit)
    task = progress.add_task(description, total=batches, status="")
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for index, (images, target) in enumerate(loader):
        if index == batches:
            break
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_offset + index, total_steps, cfg)
        loss, logits = classification_loss(model(images), target, criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.mask_grads_()
        optimizer.step()
        enforcer.apply_()
        loss_sum += loss.item() * len(target)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(target)
        rate = seen / (time.perf_counter() - start)
        progress.update(task, advance=1, status=f"loss {loss_sum / seen:.4f}  {rate:.0f} img/s")
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "acc1": 100.0 * correct / max(seen, 1), "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, limit: int | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (percent) on `loader`."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loader, batches = _limited(loader, limit)
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for index, (images, target) in enumerate(loader):
        if index == batches:
            break
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += float(criterion(logits, target))
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == target).sum())
        top5 += int((best == target[:, None]).any(1).sum())
        seen += len(target)
    if seen == 0:
        raise SparsifyError("the validation set is empty; check data.root and data.limit_val_batches")
    return {"val_loss": loss_sum / seen, "val_acc1": 100.0 * top1 / seen, "val_acc5": 100.0 * top5 / seen}


def train_epochs(
    model: nn.Module,
    train_loader: Iterable,
    *,
    enforcer: MaskEnforcer,
    cfg: OptimConfig,
    epochs: int,
    device: torch.device,
    limit: int | None = None,
    log=None,
) -> dict[str, float]:
    """Finetune for `epochs` with masks enforced; returns the last epoch's training metrics."""
    optimizer = make_optimizer(model, cfg)
    per_epoch = len(train_loader) if limit is None else min(limit, len(train_loader))
    metrics: dict[str, float] = {}
    enforcer.apply_()
    with make_progress() as progress:
        for epoch in range(epochs):
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            metrics = train_epoch(
                model, train_loader, optimizer=optimizer, enforcer=enforcer, cfg=cfg, device=device,
                step_offset=epoch * per_epoch, total_steps=epochs * per_epoch, limit=limit,
                progress=progress, description=f"epoch {epoch + 1}/{epochs}",
            )
            if log:
                log(f"epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f}, train top-1 "
                    f"{metrics['acc1']:.2f}%, {metrics['images_per_s']:.0f} img/s")
    return metrics
