"""Channel groups of pattern channel: which producers are tied, which cannot be pruned and why.

A group is one channel set (graph/channels.py) seen from its producers: the conv/Linear layers
whose output channels it carries. Producers tied through a residual add share each channel, so a
channel is pruned in all of them or in none: their scores are summed and one choice is made for
all. A set the graph cannot follow (an unknown op, a reshape across channels, the model output)
or one tied to a layer that is not pruned leaves its producers unpruned, with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sparsify.core.criteria import ScoreInputs, score_groups
from sparsify.graph.channels import batchnorm_after, is_producer, traced_graph

UNFOLLOWED = "its output channels reach no layer the channel graph follows (the model output or an unknown op)"


@dataclass
class ChannelGroups:
    """Producer sets to prune together, and the producers left alone with the reason."""

    tied: list[list[str]] = field(default_factory=list)  # every set of two or more producers
    skipped: dict[str, str] = field(default_factory=dict)  # weight name -> why it is not pruned
    batchnorm: dict[str, str] = field(default_factory=dict)  # weight name -> the BatchNorm right after it

    def record(self) -> dict:
        """What the checkpoint metadata keeps."""
        return {"tied": self.tied, "skipped": self.skipped}


def channel_groups(model: nn.Module, example: torch.Tensor, pruned: list[str]) -> ChannelGroups:
    """The groups of the `pruned` weights (the layers the pattern may prune)."""
    try:
        traced, graph = traced_graph(model, example)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow: prune nothing
        why = f"the model cannot be traced with torch.fx ({type(exc).__name__}); no channel can be followed"
        return ChannelGroups(skipped=dict.fromkeys(pruned, why))
    return groups_of_graph(model, traced, graph, pruned)


def groups_of_graph(model: nn.Module, traced: fx.GraphModule, graph, pruned: list[str]) -> ChannelGroups:
    """The groups of the `pruned` weights in a traced model's channel graph (`traced_graph`)."""
    graph.channel_sets()  # marks tensors used in more than one place
    modules = dict(model.named_modules())
    groups = ChannelGroups(batchnorm=batchnorm_after(traced))
    seen: set[str] = set()
    for i in range(len(graph.sets)):
        if graph.find(i) != i:
            continue
        s = graph.sets[i]
        producers = [n for n, dim in s.moves if dim == 0 and n.endswith(".weight")
                     and is_producer(modules.get(n[: -len(".weight")], nn.Identity()))]
        if not producers:
            continue
        seen.update(producers)
        reason = set_reason(s, producers, pruned)
        for name in producers:
            if name in pruned and reason:
                groups.skipped[name] = reason
        if not reason and len(producers) > 1:
            groups.tied.append(producers)
    for name in pruned:
        if name not in seen:
            groups.skipped[name] = UNFOLLOWED
    return groups


def set_reason(s, producers: list[str], pruned: list[str]) -> str:
    """Why the producers of channel set `s` cannot be pruned ('' when they can)."""
    if s.problem:
        return f"its channels cannot be followed: {s.problem}"
    if s.mixing:
        return f"its channels cannot be removed one by one: {s.mixing}"
    if not s.consumers:
        return UNFOLLOWED
    held = [n for n in producers if n not in pruned]
    if held:
        return f"tied through a residual add to {held[0]}, which is not pruned"
    return ""


def batchnorm_scales(model: nn.Module, groups: ChannelGroups, names: list[str]) -> dict[str, torch.Tensor]:
    """|gamma| per output channel of the BatchNorm after each named layer (criterion bn_scale)."""
    modules = dict(model.named_modules())
    scales = {}
    for name in names:
        bn = modules[groups.batchnorm[name]] if name in groups.batchnorm else None
        if bn is not None and bn.weight is not None:
            scales[name] = bn.weight.detach().abs().double().cpu()
    return scales


def tie_masks(before: dict, masks: dict, entries: list, weights: dict, tied: list[list[str]], *, criterion: str,
              pattern, inputs: dict[str, ScoreInputs]) -> tuple[dict, list]:
    """Tied producers share one choice: the fewest zeros any of them planned, lowest summed scores first.

    `before` holds the masks going into the round, `masks` and `entries` what each layer chose alone.
    Returns new masks and log entries; channels already pruned stay pruned.
    """
    masks, by_name = dict(masks), {e.name: e for e in entries}
    for names in tied:
        kept = torch.stack([before[n].reshape(-1) for n in names]).all(0)
        zeros = int((~kept).sum())
        after = min(by_name[n].zeros_after for n in names)
        if after <= zeros:
            new = kept
        else:
            total = sum(score_groups(criterion, weights[n], pattern, inputs[n]).reshape(-1) for n in names)
            order = torch.argsort(total.masked_fill(~kept, float("inf")), stable=True)
            new = kept.clone()
            new[order[: after - zeros]] = False
        for name in names:
            masks[name] = new.reshape(masks[name].shape)
            by_name[name] = dataclasses.replace(by_name[name], zeros_after=int((~new).sum()))
    return masks, [by_name[e.name] for e in entries]
