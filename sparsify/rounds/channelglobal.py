"""Scope global for pattern channel: one ranking of channel groups over the model, the target a share
of the model's multiply-adds that compaction would remove.

A group is one channel of a shrinkable channel set (graph/channelmacs.py); producers tied through a
residual add are one group. Each producer's criterion scores are divided by their mean over the
channels it still keeps, so layers of any scale compare (bn_scale's |gamma| is used as it is where
the layer has a BatchNorm: every BatchNorm scale is on one scale already); a group scores the mean
over its producers. The lowest-scored groups go first, until the multiply-adds they save reach the
round's goal: `step` of the multiply-adds left (`step_basis: target`: of those the target removes),
and never past `target` of the dense model's: a group whose removal would pass it is skipped for the
next one. A set keeps at least one channel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparsify.core.criteria import ScoreInputs, score_groups
from sparsify.core.prune import LayerRound
from sparsify.errors import TargetReached
from sparsify.graph.channelmacs import ChannelMacs

_EPS = 1e-9


def macs_budget(dense: int, now: int, target: float) -> int:
    """Multiply-adds still to remove before the model reaches `target` of its dense count (may be <= 0)."""
    return math.floor(target * dense + _EPS) - (dense - now)


def macs_goal(dense: int, now: int, *, target: float, step: float, step_basis: str) -> float:
    """What one round aims to remove: `step` of what is left (or of what the target removes), capped at the target."""
    base = now if step_basis == "remaining" else target * dense
    return min(step * base, macs_budget(dense, now, target))


def normalised(scores: torch.Tensor, kept: torch.Tensor, *, raw: bool) -> torch.Tensor:
    """`scores` divided by their mean over the `kept` channels (as they are when `raw` or that mean is 0)."""
    mean = float(scores[kept].mean()) if bool(kept.any()) else 0.0
    return scores if raw or mean <= 0 else scores / mean


def group_scores(costs: ChannelMacs, weights: dict, masks: dict, *, criterion: str, pattern,
                 inputs: dict[str, ScoreInputs]) -> dict[int, torch.Tensor]:
    """Per shrinkable set whose producers are all pruned: one score per channel (mean of normalised scores)."""
    found = {}
    for root, names in costs.producers.items():
        if not all(name in masks for name in names):
            continue
        kept = torch.stack([masks[n].reshape(-1).cpu() for n in names]).any(0)
        per = [normalised(score_groups(criterion, weights[n], pattern, inputs[n]).reshape(-1).double().cpu(), kept,
                          raw=criterion == "bn_scale" and inputs[n].channel_scale is not None) for n in names]
        found[root] = torch.stack(per).mean(0)
    return found


def ranked_channels(scores: dict[int, torch.Tensor], kept: dict[int, torch.Tensor]) -> list[tuple[int, int]]:
    """(set root, channel) of every kept channel, lowest score first (ties: set order, then channel)."""
    roots = list(scores)
    values = np.concatenate([scores[r].numpy()[kept[r].numpy()] for r in roots]) if roots else np.zeros(0)
    pairs = [(r, int(c)) for r in roots for c in kept[r].nonzero().flatten()]
    return [pairs[i] for i in np.argsort(values, kind="stable")]


def select_channels(order: list[tuple[int, int]], costs: ChannelMacs, kept: dict[int, int], *,
                    budget: int, goal: float) -> tuple[dict[int, list[int]], int]:
    """The channels to remove, per set, and the multiply-adds they save; `kept` is updated in place."""
    taken: dict[int, list[int]] = {}
    removed = 0
    for root, channel in order:
        if removed >= goal:
            break
        if kept[root] <= 1:
            continue
        cost = costs.removal_cost(root, kept)
        if removed + cost > budget:
            continue
        kept[root] -= 1
        removed += cost
        taken.setdefault(root, []).append(channel)
    return taken, removed


def refuse_without_room(costs: ChannelMacs, masks: dict, target: float) -> None:
    """TargetReached when no prunable channel can go without passing `target` of the dense multiply-adds."""
    kept = costs.kept_counts(masks)
    dense, now = costs.dense(), costs.total(kept)
    budget = macs_budget(dense, now, target)
    roots = [r for r, names in costs.producers.items() if all(n in masks for n in names) and kept[r] > 1]
    if not roots:
        raise TargetReached("nothing left to prune: no layer the channel graph follows has a channel left to "
                            "give (see `sparsify report` for the layers it cannot follow)")
    if not any(costs.removal_cost(r, kept) <= budget for r in roots):
        raise TargetReached(f"nothing left to prune: compaction would remove {1 - now / max(dense, 1):.1%} of the "
                            f"model's multiply-adds and no channel left fits under the target ({target:.0%})")


def prune_channels_global(round_, settings, number: int) -> tuple[dict, list[LayerRound]]:
    """One global round over `round_.masks` (pattern channel); records the multiply-adds in round_.meta and notes."""
    costs: ChannelMacs = round_.channel_macs
    masks, weights = round_.masks, dict(round_.model.named_parameters())
    inputs = {n: ScoreInputs(n, round_.seed, number, (round_.taylor or {}).get(n),
                             (round_.channel_scales or {}).get(n)) for n in masks}
    scores = group_scores(costs, weights, masks, criterion=settings.criterion, pattern=settings.pattern, inputs=inputs)
    alive = {r: torch.stack([masks[n].reshape(-1).cpu() for n in costs.producers[r]]).any(0) for r in scores}
    kept = costs.kept_counts(masks)
    dense, now = costs.dense(), costs.total(kept)
    goal = macs_goal(dense, now, target=settings.target, step=settings.step, step_basis=settings.step_basis)
    taken, removed = select_channels(ranked_channels(scores, alive), costs, kept,
                                     budget=macs_budget(dense, now, settings.target), goal=goal)
    new_masks, entries = removed_masks(masks, costs, taken)
    record = {"dense": dense, "compact": costs.total(kept), "removed": round(1 - costs.total(kept) / max(dense, 1), 6),
              "target": settings.target, "round_removed": removed}
    round_.meta["channel_macs"] = record
    round_.notes.append(describe_macs(record))
    return new_masks, entries


def removed_masks(masks: dict, costs: ChannelMacs, taken: dict[int, list[int]]) -> tuple[dict, list[LayerRound]]:
    """New masks with the `taken` channels of each set zeroed in all its producers, and the log entries."""
    new = {n: m.clone() for n, m in masks.items()}
    for root, channels in taken.items():
        for name in costs.producers[root]:
            new[name].reshape(-1)[channels] = False
    entries = []
    for name, mask in masks.items():
        before, after = int((~mask).sum()), int((~new[name]).sum())
        entries.append(LayerRound(name, mask.numel(), before, after, after, after - before))
    return new, entries


def describe_macs(record: dict) -> str:
    """'multiply-adds per image 5.2M -> 2.6M after compaction (49.8% removed; target 50%)'."""
    return (f"multiply-adds per image {human(record['dense'])} -> {human(record['compact'])} after compaction "
            f"({record['removed']:.1%} removed; target {record['target']:.0%})")


def human(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:g}"

