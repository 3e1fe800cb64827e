"""RoundHook: a step of the prune round around the ranking, with its own metadata and carry rule.

`sparsify prune` is target check -> hooks -> score -> select -> hooks -> save: a round whose masks
already hold the target stops before any hook runs, so no hook spends time on a round that
prunes nothing (a hook's own refusal comes next). A hook sees one `PruneRound` and may act
before the groups are scored (`before_scores`: permute input channels, accumulate Taylor
saliency, refuse a round) and after the new masks exist (`after_select`: regroup them, rewind
the kept weights). What a hook writes into `round.meta` goes into the pruned checkpoint; its
`carry(parent_meta, same_round)` says which of the parent checkpoint's keys the later
checkpoints keep. Hooks are listed in ROUND_HOOKS in the order they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


@dataclass
class PruneRound:
    """What the hooks of one prune round share."""

    model: nn.Module
    pattern: Any
    sparsity: Any  # the config's `sparsity:` section
    parent_meta: dict  # metadata of the checkpoint being pruned
    masks: dict[str, torch.Tensor]  # the masks going in (full masks for layers not pruned yet)
    first_round: bool  # the model has no masks yet
    seed: int
    train_batches: Callable[[], Any]  # a training loader for hooks that need data (taylor)
    device: torch.device
    rewind_point: Callable[[], dict] | None = None  # the rewind state, read when a hook asks
    taylor: dict[str, torch.Tensor] | None = None
    channel_scales: dict[str, torch.Tensor] | None = None  # |gamma| per output channel (criterion bn_scale)
    channel_macs: Any = None  # pattern channel with scope global: the multiply-adds model (graph/channelmacs.py)
    entries: list = field(default_factory=list)  # LayerRound per layer, after the ranking
    meta: dict = field(default_factory=dict)  # what the pruned checkpoint records
    notes: list[str] = field(default_factory=list)  # one phrase per hook for the stage's result line

    @property
    def eligible(self) -> list[str]:
        return list(self.masks)


class RoundHook:
    """Base class: every step is a no-op."""

    name: ClassVar[str]
    meta_key: ClassVar[str | None] = None  # the checkpoint metadata key this hook owns

    def active(self, sparsity) -> bool:
        return False

    def before_scores(self, round_: PruneRound) -> None:
        """Before the groups are scored."""

    def after_select(self, round_: PruneRound) -> None:
        """After the new masks exist (round_.masks), before they are applied."""

    def carry(self, parent_meta: dict, *, same_round: bool) -> dict:
        """Keys of the parent checkpoint's metadata that a later checkpoint keeps."""
        return {}
