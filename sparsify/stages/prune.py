"""`sparsify prune`: one round. Target check -> round hooks -> score -> select -> round hooks ->
BatchNorm re-estimation -> save."""

from __future__ import annotations

import dataclasses

from sparsify.config import RunConfig
from sparsify.core.allocation import check_one_round, layer_targets
from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.core.patterns import build_pattern
from sparsify.core.prune import LayerRound, PruneSettings, find_layers, prune_round, target_zero_count
from sparsify.console import log
from sparsify.errors import SparsifyError, TargetReached
from sparsify.io.rundir import RunDir
from sparsify.io.sensitivity import read_curves
from sparsify.registry import METHODS
from sparsify.rounds.base import PruneRound
from sparsify.rounds.channelglobal import prune_channels_global
from sparsify.rounds.hooks import ROUND_HOOKS
from sparsify.rounds.rewind import rewind_state
from sparsify.stages.run import StageResult, checkpoint_loaders, opened_run, save_resolved_config, write_stage
from sparsify.training.bn import batchnorm_layers, recalibrate_batchnorm_
from sparsify.training.distributed import resolve_device
from sparsify.training.log import drop_rows_after
from sparsify.training.loop import evaluate
from sparsify.training.stage import METRICS_CSV


def prune(config: RunConfig, *, show_eval: bool = False) -> StageResult:
    """One round: zero `step` of the remaining groups in every eligible layer, then re-estimate BatchNorm
    (`show_eval`: the validation top-1 before and after the re-estimation goes into the message)."""
    s = config.sparsity
    if not METHODS.get(s.method).prune_rounds:
        raise SparsifyError(f"method {s.method} sets the masks while training, so there are no "
                            "prune rounds; use `sparsify train` or `sparsify run`")
    with opened_run(config, "prune") as (run, loaded, started):
        round_ = start_round(config, run, loaded)
        weights = dict(loaded.model.named_parameters())
        targets = plan_targets(round_.masks, weights, round_.pattern, s, run_root=run.root)
        refuse_at_target(round_.masks, weights, round_.pattern, s, targets)
        hooks = [hook for hook in ROUND_HOOKS if hook.active(s)]
        for hook in hooks:
            hook.before_scores(round_)
        settings = PruneSettings(pattern=round_.pattern, criterion=s.criterion, target=s.target, step=s.step,
                                 step_basis=s.step_basis, keep_rows=s.keep_rows, keep_cols=s.keep_cols,
                                 balanced=s.balanced, scope=s.scope, layer_targets=targets)
        number = loaded.checkpoint.meta["round"] + 1
        if round_.channel_macs is not None:  # pattern channel, scope global: a share of the multiply-adds
            round_.masks, round_.entries = prune_channels_global(round_, settings, number)
        else:
            round_.masks, round_.entries = prune_round(dict(loaded.model.named_parameters()), round_.masks,
                                                       settings, seed=config.seed, round_=number,
                                                       taylor=round_.taylor, channel_scales=round_.channel_scales)
        if sum(e.zeros_after - e.zeros_before for e in round_.entries) == 0:
            raise TargetReached(target_message(round_.entries, shown_target(s), scope=s.scope))
        for hook in hooks:
            hook.after_select(round_)
        MaskEnforcer(loaded.model, round_.masks, round_.pattern).apply_()
        round_.meta.update(recalibrate_round(config, round_, show_eval=show_eval))
        meta = {"pattern": round_.pattern.spec(), "prune_log": [dataclasses.asdict(e) for e in round_.entries],
                **({"layer_targets": targets} if shown_target(s) is None else {}), **round_.meta}
        result = write_stage(run, config, command="prune", parent=loaded.checkpoint, model=loaded.model,
                             masks=round_.masks, round_=number, stage="pruned", metrics={}, started=started,
                             extra_meta=meta)
        forget_abandoned_rows(run, loaded.checkpoint.path.name)
        save_resolved_config(run, config)
    result.message = round_message(number, round_, result.sparsity)
    return result


def forget_abandoned_rows(run: RunDir, parent: str) -> None:
    """Drop the metrics.csv rows of a train stage started from `parent` and abandoned (killed, then pruned instead
    of rerun): they belong to no checkpoint. The pruned checkpoint is written by then: a failure is a remark."""
    try:
        drop_rows_after(run.root / METRICS_CSV, start=parent, step=0)
    except SparsifyError as exc:
        log(f"note: {exc} (rows of an abandoned train stage stay in metrics.csv)")


def recalibrate_round(config: RunConfig, round_: PruneRound, *, show_eval: bool) -> dict:
    """Re-estimate BatchNorm on `sparsity.recalibrate_bn` training batches of the round's loader (masks
    applied; see training/bn.py); its metadata, and a note with the validation top-1 when `show_eval`."""
    layers = len(batchnorm_layers(round_.model))
    wanted = config.sparsity.recalibrate_bn if layers else 0
    model = round_.model.to(round_.device)
    try:
        before = validation_top1(config, round_) if show_eval else None
        seen = recalibrate_batchnorm_(model, round_.train_batches(), limit=wanted, device=round_.device)
        after = validation_top1(config, round_) if show_eval and seen else before
    finally:
        round_.model.cpu()
    if seen:
        round_.notes.append(f"BatchNorm re-estimated on {seen} batches ({layers} layers)"
                            + (f"; val top-1 {before:.2f}% before, {after:.2f}% after" if show_eval else ""))
    elif show_eval:
        why = "no BatchNorm" if not layers else "recalibrate_bn is 0" if not wanted else "no training batch"
        round_.notes.append(f"val top-1 {before:.2f}% (BatchNorm not re-estimated: {why})")
    if not seen:
        return {}
    evals = {"val_acc1_before": round(before, 4), "val_acc1_after": round(after, 4)} if show_eval else {}
    return {"bn_recalibration": {"batches": seen, "layers": layers, **evals}}


def validation_top1(config: RunConfig, round_: PruneRound) -> float:
    """Top-1 (percent) of the round's model on the validation loader (data.limit_val_batches)."""
    val_loader = checkpoint_loaders(config, round_.parent_meta, seed=config.seed, pin_memory=False)[1]
    return evaluate(round_.model, val_loader, device=round_.device, limit=config.data.limit_val_batches)["val_acc1"]


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


def plan_targets(masks: dict, weights: dict, pattern, s, *, run_root=None) -> dict[str, float]:
    """Each eligible layer's target from sparsity.target, .layers and .allocation (core/allocation.py;
    allocation sensitivity reads the curves in `run_root`/sensitivity.json)."""
    shapes = {name: tuple(weights[name].shape) for name in masks}
    if pattern.one_round:
        targets = layer_targets(shapes, {n: m.numel() for n, m in masks.items()}, target=s.target,
                                allocation="uniform", overrides=s.layers)
        check_one_round(targets, pattern_target=s.target, allocation=s.allocation)
        return targets
    groups = {name: int(pattern.grid(mask).numel()) for name, mask in masks.items()}
    curves = read_curves(run_root, list(masks)) if s.allocation == "sensitivity" else None
    return layer_targets(shapes, groups, target=s.target, allocation=s.allocation, overrides=s.layers, curves=curves)


def shown_target(s) -> float | None:
    """The target a message names: the model-wide one, or None when layers have their own."""
    return s.target if not s.layers and s.allocation == "uniform" else None


def refuse_at_target(masks: dict, weights: dict, pattern, s, targets: dict[str, float] | None = None) -> None:
    """TargetReached before any hook spends time (permutation search, Taylor gradients) when the
    masks going in already hold every layer's target count (the model-wide one for scope global; with pattern
    channel the channel hook checks the model's multiply-adds instead)."""
    targets = targets or dict.fromkeys(masks, s.target)
    entries = [counts_now(name, mask, tuple(weights[name].shape), pattern, target=targets[name], balanced=s.balanced)
               for name, mask in masks.items()]
    if s.scope == "global" and pattern.global_share == "macs":
        return  # the channel hook counts the multiply-adds left (rounds/channelglobal.py)
    if s.scope == "global":
        total = target_zero_count((1, sum(e.groups for e in entries)), s.target, False)
        room = sum(e.zeros_before for e in entries) < total
    else:
        room = any(e.zeros_before < e.target_zeros for e in entries)
    if not room:
        raise TargetReached(target_message(entries, shown_target(s), scope=s.scope))


def counts_now(name: str, mask, shape: tuple, pattern, *, target: float, balanced: bool) -> LayerRound:
    """A layer's groups, zeros and target count before the round, by the rules `prune_round` counts with."""
    if pattern.one_round:
        groups, zeros = mask.numel(), int(mask.numel() - mask.sum())
        target_zeros = pattern.target_zeros(shape) if target > 0 else 0
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


def target_message(entries, target: float | None, *, scope: str = "layer") -> str:
    """Why nothing is left to prune; `target` None: the layers have their own targets."""
    stuck = [e for e in entries if e.zeros_before < e.target_zeros]
    if scope == "global":
        return (f"nothing left to prune: the eligible weights reached the model-wide target ({target:.0%}) "
                "or the constraints hold the rest; see `sparsify report`")
    if not stuck:
        which = f"its target ({target:.0%})" if target is not None else "its own target (sparsity.layers/allocation)"
        return f"every eligible layer is at {which}; nothing left to prune"
    return (f"no more groups can be pruned: {len(entries) - len(stuck)} layers are at their target and "
            f"{len(stuck)} are held by the constraints (e.g. {stuck[0].name}); see `sparsify report`")
