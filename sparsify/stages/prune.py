"""`sparsify prune`: one round. Target check -> round hooks -> score -> select -> round hooks -> save."""

from __future__ import annotations

import dataclasses

from sparsify.config import RunConfig
from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.core.patterns import build_pattern
from sparsify.core.prune import LayerRound, PruneSettings, find_layers, prune_round, target_zero_count
from sparsify.errors import SparsifyError, TargetReached
from sparsify.registry import METHODS
from sparsify.rounds.base import PruneRound
from sparsify.rounds.hooks import ROUND_HOOKS
from sparsify.rounds.rewind import rewind_state
from sparsify.stages.run import StageResult, checkpoint_loaders, opened_run, save_resolved_config, write_stage
from sparsify.training.distributed import resolve_device


def prune(config: RunConfig) -> StageResult:
    """One round: zero `step` of the remaining groups in every eligible layer."""
    s = config.sparsity
    if not METHODS.get(s.method).prune_rounds:
        raise SparsifyError(f"method {s.method} sets the masks while training, so there are no "
                            "prune rounds; use `sparsify train` or `sparsify run`")
    with opened_run(config, "prune") as (run, loaded, started):
        round_ = start_round(config, run, loaded)
        refuse_at_target(round_.masks, dict(loaded.model.named_parameters()), round_.pattern, s)
        hooks = [hook for hook in ROUND_HOOKS if hook.active(s)]
        for hook in hooks:
            hook.before_scores(round_)
        settings = PruneSettings(pattern=round_.pattern, criterion=s.criterion, target=s.target, step=s.step,
                                 step_basis=s.step_basis, keep_rows=s.keep_rows, keep_cols=s.keep_cols,
                                 balanced=s.balanced, scope=s.scope)
        number = loaded.checkpoint.meta["round"] + 1
        round_.masks, round_.entries = prune_round(dict(loaded.model.named_parameters()), round_.masks, settings,
                                                   seed=config.seed, round_=number, taylor=round_.taylor)
        if sum(e.zeros_after - e.zeros_before for e in round_.entries) == 0:
            raise TargetReached(target_message(round_.entries, s.target, scope=s.scope))
        for hook in hooks:
            hook.after_select(round_)
        MaskEnforcer(loaded.model, round_.masks, round_.pattern).apply_()
        meta = {"pattern": round_.pattern.spec(), "prune_log": [dataclasses.asdict(e) for e in round_.entries],
                **round_.meta}
        result = write_stage(run, config, command="prune", parent=loaded.checkpoint, model=loaded.model,
                             masks=round_.masks, round_=number, stage="pruned", metrics={}, started=started,
                             extra_meta=meta)
        save_resolved_config(run, config)
    result.message = round_message(number, round_, result.sparsity)
    return result


def start_round(config: RunConfig, run, loaded) -> PruneRound:
    """The round's shared state: the eligible layers' masks so far, and what the hooks may read."""
    s, meta = config.sparsity, loaded.checkpoint.meta
    pattern = build_pattern(s.pattern.model_dump())
    layers = find_layers(loaded.model, pattern, include_linear=s.include_linear, exclude=s.exclude)
    eligible = [layer.name for layer in layers if layer.reason is None]
    if not eligible:
        raise SparsifyError("no layer of this model is eligible for pruning; see `sparsify report` for the reasons")
    masks = full_masks(loaded.model, eligible, pattern)
    masks.update({n: m for n, m in loaded.masks.items() if n in masks})

    def train_batches():
        return checkpoint_loaders(config, meta, seed=config.seed + meta["round"] + 1, pin_memory=False)[0]

    return PruneRound(model=loaded.model, pattern=pattern, sparsity=s, parent_meta=meta, masks=masks,
                      first_round=not loaded.masks, seed=config.seed, train_batches=train_batches,
                      device=resolve_device(config.device), rewind_point=lambda: rewind_state(run, s.rewind))


def refuse_at_target(masks: dict, weights: dict, pattern, s) -> None:
    """TargetReached before any hook spends time (permutation search, Taylor gradients) when the
    masks going in already hold every layer's target count (the model-wide one for scope global)."""
    entries = [counts_now(name, mask, tuple(weights[name].shape), pattern, target=s.target, balanced=s.balanced)
               for name, mask in masks.items()]
    if s.scope == "global":
        total = target_zero_count((1, sum(e.groups for e in entries)), s.target, False)
        room = sum(e.zeros_before for e in entries) < total
    else:
        room = any(e.zeros_before < e.target_zeros for e in entries)
    if not room:
        raise TargetReached(target_message(entries, s.target, scope=s.scope))


def counts_now(name: str, mask, shape: tuple, pattern, *, target: float, balanced: bool) -> LayerRound:
    """A layer's groups, zeros and target count before the round, by the rules `prune_round` counts with."""
    if pattern.one_round:
        groups, zeros, target_zeros = mask.numel(), int(mask.numel() - mask.sum()), pattern.target_zeros(shape)
    else:
        grid = pattern.grid(mask)
        groups, zeros = grid.numel(), int(grid.numel() - grid.sum())
        target_zeros = target_zero_count(tuple(grid.shape), target, balanced)
    return LayerRound(name, groups, zeros, zeros, target_zeros, 0)


def round_message(number: int, round_: PruneRound, sparsity: float) -> str:
    entries = round_.entries
    zeroed = sum(e.zeros_after - e.zeros_before for e in entries)
    blocked = [e for e in entries if e.note]
    return (f"round {number}: zeroed {zeroed} groups in {sum(e.zeros_after > e.zeros_before for e in entries)}"
            f"/{len(entries)} layers; sparsity {sparsity:.2%} of eligible weights"
            + (f"; {len(blocked)} layers limited by constraints" if blocked else "")
            + "".join(f"; {note}" for note in round_.notes))


def target_message(entries, target: float, *, scope: str = "layer") -> str:
    stuck = [e for e in entries if e.zeros_before < e.target_zeros]
    if scope == "global":
        return (f"nothing left to prune: the eligible weights reached the model-wide target ({target:.0%}) "
                "or the constraints hold the rest; see `sparsify report`")
    if not stuck:
        return f"every eligible layer is at its target ({target:.0%}); nothing left to prune"
    return (f"no more groups can be pruned: {len(entries) - len(stuck)} layers are at the target and "
            f"{len(stuck)} are held by the constraints (e.g. {stuck[0].name}); see `sparsify report`")
