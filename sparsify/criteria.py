"""Criteria: a score per group (low scores are pruned first), computed in float64.

Each criterion is a mean over the group's elements, so a short tail block is neither favoured
nor penalised for its size.
"""

from __future__ import annotations

import torch

from sparsify.errors import SparsifyError
from sparsify.registry import Registry

CRITERIA: Registry = Registry("criterion")


@CRITERIA.register("variance")
def variance_score(weight: torch.Tensor, pattern) -> torch.Tensor:
    """Population variance of each group (the first recipe's default)."""
    if pattern.name == "unstructured":
        raise SparsifyError(
            "criterion 'variance' needs groups of several weights; with pattern 'unstructured' "
            "use criterion l1 or l2"
        )
    w = weight.detach().double()
    sizes = pattern.group_sizes(w.shape)
    mean = pattern.group_sum(w) / sizes
    mean_sq = pattern.group_sum(w * w) / sizes
    return (mean_sq - mean * mean).clamp_min_(0.0)


@CRITERIA.register("l1")
def l1_score(weight: torch.Tensor, pattern) -> torch.Tensor:
    """Mean absolute value of each group."""
    w = weight.detach().double()
    return pattern.group_sum(w.abs()) / pattern.group_sizes(w.shape)


@CRITERIA.register("l2")
def l2_score(weight: torch.Tensor, pattern) -> torch.Tensor:
    """Root mean square of each group."""
    w = weight.detach().double()
    return (pattern.group_sum(w * w) / pattern.group_sizes(w.shape)).sqrt()


def score_groups(name: str, weight: torch.Tensor, pattern) -> torch.Tensor:
    return CRITERIA.get(name)(weight, pattern)
