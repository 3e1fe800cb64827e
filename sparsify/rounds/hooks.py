"""The built-in round hooks, in the order a prune round runs them: regroup (its refusal first), permute,
taylor saliency, rewind (see sparsify.rounds.base)."""

from __future__ import annotations

from sparsify.console import log
from sparsify.core.criteria import accumulate_taylor
from sparsify.core.masks import MaskEnforcer
from sparsify.errors import TargetReached
from sparsify.registry import CRITERIA
from sparsify.rounds.base import PruneRound, RoundHook
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


class Rewind(RoundHook):
    """Lottery-ticket rewinding: the kept weights go back to the rewind point (BatchNorm state included)."""

    name = "rewind"

    def active(self, sparsity) -> bool:
        return sparsity.rewind is not None

    def after_select(self, round_: PruneRound) -> None:
        rewind_model_(round_.model, round_.rewind_point(), round_.masks, round_.pattern)


ROUND_HOOKS: list[RoundHook] = [Regroup(), Permute(), TaylorSaliency(), Rewind()]  # a refused round costs nothing


def carried_meta(parent_meta: dict, *, same_round: bool) -> dict:
    """What every hook keeps of the parent checkpoint's metadata in a later checkpoint."""
    carried: dict = {}
    for hook in ROUND_HOOKS:
        carried.update(hook.carry(parent_meta, same_round=same_round))
    return carried
