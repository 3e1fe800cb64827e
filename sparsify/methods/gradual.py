"""Gradual pruning inside training (method `gradual`, Zhu & Gupta 2017).

The sparsity follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3

from `initial` (s_i) at step t0 (`start` epochs) to the target (s_f) at step t0 + n*dt (`end`
epochs), pruning every `frequency` (dt) optimizer steps. At each pruning step every eligible
layer is pruned to s_t with the configured criterion by `sparsify.core.prune.prune_layer` (scores of
the kept groups, the same constraints as a prune round), so masks only shrink.

Steps count over every train stage of the run (carried in checkpoint metadata as
`method_state.gradual_step`), so `sparsify train --epochs 1` repeated continues the schedule.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from sparsify.core.patterns import build_pattern
from sparsify.core.prune import PruneSettings, prune_layer
from sparsify.errors import SparsifyError
from sparsify.methods.base import Method, MethodOptions
from sparsify.registry import METHODS
from sparsify.training.callbacks import TrainCallback


def cubic_sparsity(step: int, *, initial: float, target: float, start: int, end: int) -> float:
    """Scheduled sparsity after `step` optimizer steps (initial before `start`, target from `end`)."""
    if step <= start:
        return initial
    if step >= end:
        return target
    remaining = 1.0 - (step - start) / (end - start)
    return target + (initial - target) * remaining ** 3


def is_pruning_step(step: int, *, start: int, end: int, frequency: int) -> bool:
    """True at start, every `frequency` steps after it, and at `end`."""
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)


def schedule_steps(start_epoch: float, end_epoch: float, *, steps_per_epoch: int) -> tuple[int, int]:
    """Start and end of the schedule in optimizer steps."""
    start, end = round(start_epoch * steps_per_epoch), round(end_epoch * steps_per_epoch)
    if end <= start:
        raise SparsifyError(f"gradual: end ({end_epoch} epochs = step {end}) must come after start "
                            f"({start_epoch} epochs = step {start}); raise sparsity.gradual.end")
    return start, end


class GradualCallbacks(TrainCallback):
    """Train callbacks of method gradual: prune every layer to s_t at each pruning step.

    The schedule needs the batches per epoch: `context.extra["steps_per_epoch"]`, or `prepare`
    (the train stage calls it once its loader exists).
    """

    def __init__(self, context) -> None:
        s = context.sparsity
        self.cfg = s.gradual
        self.target = s.target
        self.eligible = list(context.eligible)
        pattern = build_pattern(s.pattern.model_dump())
        self.settings = PruneSettings(pattern=pattern, criterion=s.criterion, target=s.target, step=1.0,
                                      keep_rows=s.keep_rows, keep_cols=s.keep_cols, balanced=s.balanced)
        self.start = self.end = None
        if "steps_per_epoch" in context.extra:
            self.set_steps_per_epoch(context.extra["steps_per_epoch"])
        state = context.parent_meta.get("method_state") or {}
        self.step = int(state.get("gradual_step", 0))
        self.last_pruned = int(state.get("gradual_last_pruned", -1))
        self.log: list[list] = []

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        self.start, self.end = schedule_steps(self.cfg.start, self.cfg.end, steps_per_epoch=steps_per_epoch)

    def prepare(self, model: nn.Module, enforcer, *, steps_per_epoch: int) -> None:
        """Called by the train stage before the optimizer exists: the schedule in steps."""
        self.set_steps_per_epoch(steps_per_epoch)

    def on_train_start(self, model: nn.Module, enforcer) -> None:
        """All-kept masks for eligible layers without one, then the pruning step due now (if any)."""
        params = dict(model.named_parameters())
        for name in self.eligible:
            if name not in enforcer.masks:
                shape = self.settings.pattern.mask_shape(tuple(params[name].shape))
                enforcer.set_mask(name, torch.ones(shape, dtype=torch.bool))
        self.maybe_prune(model, enforcer)

    def after_step(self, step: int, epoch: int, model: nn.Module, enforcer) -> None:
        self.step += 1
        self.maybe_prune(model, enforcer)

    def maybe_prune(self, model: nn.Module, enforcer) -> None:
        """Prune to the scheduled sparsity when this step is a pruning step not done yet."""
        if self.step == self.last_pruned or not is_pruning_step(
                self.step, start=self.start, end=self.end, frequency=self.cfg.frequency):
            return
        sparsity = cubic_sparsity(self.step, initial=self.cfg.initial, target=self.target,
                                  start=self.start, end=self.end)
        zeroed = prune_to_(model, enforcer, self.eligible, replace(self.settings, target=sparsity))
        self.last_pruned = self.step
        self.log.append([self.step, round(sparsity, 6), zeroed])

    def stage_meta(self) -> dict:
        return {"gradual_step": self.step, "gradual_last_pruned": self.last_pruned, "gradual_log": self.log}

    def state_dict(self) -> dict:
        return {"step": self.step, "last_pruned": self.last_pruned, "log": self.log}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.last_pruned, self.log = int(state["step"]), int(state["last_pruned"]), list(state["log"])


@torch.no_grad()
def prune_to_(model: nn.Module, enforcer, names: list[str], settings: PruneSettings) -> int:
    """Prune each named layer to `settings.target` (masks only shrink); returns groups zeroed."""
    params = dict(model.named_parameters())
    zeroed = 0
    for name in names:
        new_mask, entry = prune_layer(name, params[name], enforcer.masks[name], settings)
        if entry.zeros_after > entry.zeros_before:
            enforcer.set_mask(name, new_mask)
            zeroed += entry.zeros_after - entry.zeros_before
    if zeroed:
        enforcer.apply_()
    return zeroed


def make_callbacks(context) -> list:
    """Callbacks factory of `method: gradual` (see sparsify.methods.base)."""
    return [GradualCallbacks(context)]


class GradualOptions(MethodOptions):
    """Gradual pruning (`method: gradual`): cubic schedule from `initial` to `sparsity.target` (Zhu & Gupta 2017)."""

    initial: float = Field(default=0.0, ge=0.0, lt=1.0)  # s_i: sparsity of the first pruning step
    start: float = Field(default=0.0, ge=0.0)  # t0 in epochs (counted over all train stages of the run)
    end: float = Field(default=1.0, gt=0.0)  # epoch at which the target is reached
    frequency: int = Field(default=100, ge=1)  # optimizer steps between pruning steps (delta t)


@METHODS.register("gradual")
class Gradual(Method):
    name = "gradual"
    Options = GradualOptions
    summary = ("gradual pruning inside training (Zhu & Gupta 2017): cubic schedule from `initial` to the "
               "target, pruning every `frequency` steps")
    prune_rounds = False
    patterns = ("block", "unstructured")
    callbacks = staticmethod(make_callbacks)
