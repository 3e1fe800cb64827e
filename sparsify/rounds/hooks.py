"""The built-in round hooks, in the order a prune round runs them: regroup (its refusal first), channel
groups, BatchNorm scales, permute, taylor saliency, rewind (see sparsify.rounds.base)."""

from __future__ import annotations

from sparsify.console import log
from sparsify.core.criteria import ScoreInputs, accumulate_taylor
from sparsify.core.masks import MaskEnforcer
from sparsify.errors import SparsifyError, TargetReached
from sparsify.registry import CRITERIA, PATTERNS
from sparsify.rounds.base import PruneRound, RoundHook
from sparsify.graph.channelmacs import channel_macs
from sparsify.graph.channels import batchnorm_after, traced_graph
from sparsify.rounds.channelglobal import refuse_without_room
from sparsify.rounds.channelgroups import ChannelGroups, batchnorm_scales, channel_groups, groups_of_graph, tie_masks
from sparsify.rounds.permute import describe_permutation, permute_before_prune_
from sparsify.rounds.regroup import describe_regroup, imp_at_target, regroup_round
from sparsify.rounds.rewind import rewind_model_


class Permute(RoundHook):
    """nm: permute input channels once, before the only round; permuted weights stay permuted."""

    name, meta_key = "permute", "permutation"

    def active(self, sparsity) -> bool:
        return sparsity.permute.enabled

    def before_scores(self, round_: PruneRound) -> None:
        if not round_.first_round:
            return
        options = round_.sparsity.permute
        log(f"permutation: searching input-channel orders ({options.max_iterations} iterations, "
            f"time limit {options.time_limit:g} s)")
        round_.meta.update(permute_before_prune_(
            round_.model, round_.parent_meta, pattern=round_.pattern, eligible=round_.eligible,
            max_iterations=options.max_iterations, time_limit=options.time_limit, seed=round_.seed))
        round_.notes.append(describe_permutation(round_.meta["permutation"]))

    def carry(self, parent_meta: dict, *, same_round: bool) -> dict:
        return {"permutation": parent_meta["permutation"]} if "permutation" in parent_meta else {}


class TaylorSaliency(RoundHook):
    """Criteria that need gradients: |w * dL/dw| over `criterion_batches` training batches, masks applied."""

    name = "saliency"

    def active(self, sparsity) -> bool:
        return CRITERIA.get(sparsity.criterion).needs_gradients

    def before_scores(self, round_: PruneRound) -> None:
        model = round_.model.to(round_.device)
        MaskEnforcer(model, round_.masks, round_.pattern).apply_()
        try:
            round_.taylor = accumulate_taylor(model, round_.train_batches(), names=round_.eligible,
                                              limit=round_.sparsity.criterion_batches, device=round_.device)
        finally:
            round_.model.cpu()


class Regroup(RoundHook):
    """Unstructured masks become unions of dense blocks after each prune (seed 002)."""

    name, meta_key = "regroup", "regroup"

    def active(self, sparsity) -> bool:
        return sparsity.regroup.enabled

    def before_scores(self, round_: PruneRound) -> None:
        if (round_.parent_meta.get("regroup") or {}).get("imp_at_target"):
            raise TargetReached(f"the last prune reached the target ({round_.sparsity.target:.0%}) before regroup; "
                                "nothing left to prune")

    def after_select(self, round_: PruneRound) -> None:
        s = round_.sparsity
        round_.masks, round_.meta["regroup"] = regroup_round(
            round_.masks, round_.pattern, s.regroup, at_target=imp_at_target(round_.entries, scope=s.scope,
                                                                             target=s.target))
        round_.notes.append(describe_regroup(round_.meta["regroup"]))

    def carry(self, parent_meta: dict, *, same_round: bool) -> dict:
        return {"regroup": parent_meta["regroup"]} if same_round and parent_meta.get("regroup") else {}


def example_input(meta: dict, seed: int):
    """One random input of the checkpoint's input shape, for tracing."""
    import torch

    return torch.randn(1, meta["in_channels"], meta["input_size"], meta["input_size"],
                       generator=torch.Generator().manual_seed(seed))


class ChannelCoupling(RoundHook):
    """Pattern channel: producers the channel graph cannot follow are not pruned (the reason is recorded);
    producers tied through residual adds are pruned together, by their summed scores. With scope global the
    hook also builds the multiply-adds model the global ranking counts with (rounds/channelglobal.py) and
    stops the round when no channel fits under the target."""

    name, meta_key = "channel", "channel_groups"

    def __init__(self) -> None:
        self.before: dict = {}
        self.tied: list[list[str]] = []

    def active(self, sparsity) -> bool:
        return getattr(PATTERNS.get(sparsity.pattern.type), "couples_channels", False)

    def before_scores(self, round_: PruneRound) -> None:
        example = example_input(round_.parent_meta, round_.seed)
        if round_.sparsity.scope == "global":
            groups = self.global_groups(round_, example)
        else:
            groups = channel_groups(round_.model, example, list(round_.masks))
        for name in groups.skipped:
            round_.masks.pop(name, None)
        if round_.channel_macs is not None:
            refuse_without_room(round_.channel_macs, round_.masks, round_.sparsity.target)
        self.tied = [names for names in groups.tied if all(n in round_.masks for n in names)]
        self.before = {n: round_.masks[n].clone() for names in self.tied for n in names}
        round_.meta["channel_groups"] = groups.record()
        skipped = len(groups.skipped)
        if self.tied:
            round_.notes.append(f"{len(self.tied)} sets of layers tied through residual adds pruned together")
        if skipped:
            round_.notes.append(f"{skipped} layer{'s' * (skipped != 1)} not pruned (the channel graph cannot "
                                "follow them; see `sparsify report`)")

    @staticmethod
    def global_groups(round_: PruneRound, example) -> ChannelGroups:
        """Scope global: the groups, and the multiply-adds model the ranking counts with (round_.channel_macs)."""
        try:
            traced, graph = traced_graph(round_.model, example)
        except Exception as exc:
            raise SparsifyError(f"sparsity.scope 'global' with pattern channel counts multiply-adds over the "
                                f"model's channel graph, and torch.fx cannot trace this model ({type(exc).__name__}); "
                                "use scope: layer") from None
        groups = groups_of_graph(round_.model, traced, graph, list(round_.masks))
        round_.channel_macs = channel_macs(traced, graph)
        return groups

    def after_select(self, round_: PruneRound) -> None:
        if round_.channel_macs is not None:  # the global ranking chose each tied set's channels once
            self.before, self.tied = {}, []
            return
        number = round_.parent_meta["round"] + 1
        taylor, scales = round_.taylor or {}, round_.channel_scales or {}
        inputs = {n: ScoreInputs(n, round_.seed, number, taylor.get(n), scales.get(n)) for n in self.before}
        weights = dict(round_.model.named_parameters())
        round_.masks, round_.entries = tie_masks(self.before, round_.masks, round_.entries, weights, self.tied,
                                                 criterion=round_.sparsity.criterion, pattern=round_.pattern,
                                                 inputs=inputs)
        self.before, self.tied = {}, []

    def carry(self, parent_meta: dict, *, same_round: bool) -> dict:
        kept = ("channel_groups", "channel_macs") if same_round else ("channel_groups",)  # a new round counts anew
        return {key: parent_meta[key] for key in kept if key in parent_meta}


class BatchNormScales(RoundHook):
    """Criterion bn_scale: |gamma| of the BatchNorm right after each layer (layers without one score as l2)."""

    name = "bn_scales"

    def active(self, sparsity) -> bool:
        return CRITERIA.get(sparsity.criterion).needs_channel_scales

    def before_scores(self, round_: PruneRound) -> None:
        from torch import fx

        try:
            after = batchnorm_after(fx.symbolic_trace(round_.model))
        except Exception as exc:  # untraceable: no BatchNorm is known to follow any layer
            after = {}
            round_.notes.append(f"bn_scale: the model cannot be traced ({type(exc).__name__}); layers score as l2")
        round_.channel_scales = batchnorm_scales(round_.model, ChannelGroups(batchnorm=after), round_.eligible)


class Rewind(RoundHook):
    """Lottery-ticket rewinding: the kept weights go back to the rewind point (BatchNorm state included)."""

    name = "rewind"

    def active(self, sparsity) -> bool:
        return sparsity.rewind is not None

    def after_select(self, round_: PruneRound) -> None:
        rewind_model_(round_.model, round_.rewind_point(), round_.masks, round_.pattern)


ROUND_HOOKS: list[RoundHook] = [Regroup(), ChannelCoupling(), BatchNormScales(), Permute(), TaylorSaliency(),
                                Rewind()]  # a refused round costs nothing


def carried_meta(parent_meta: dict, *, same_round: bool) -> dict:
    """What every hook keeps of the parent checkpoint's metadata in a later checkpoint."""
    carried: dict = {}
    for hook in ROUND_HOOKS:
        carried.update(hook.carry(parent_meta, same_round=same_round))
    return carried
