"""Iterative magnitude pruning with scope global: one ranking over all layers, exact counts."""

import math

import pytest
import torch

from sparsify.errors import SparsifyError
from sparsify.patterns import BlockPattern, UnstructuredPattern
from sparsify.prune import PruneSettings, prune_round


def imp_settings(**kw):
    base = dict(pattern=UnstructuredPattern(), criterion="l1", target=0.8, step=0.2, step_basis="remaining",
                keep_rows=False, keep_cols=False, balanced=False, scope="global")
    base.update(kw)
    return PruneSettings(**base)


def full(weights):
    return {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()}


def test_global_ranking_takes_the_smallest_raw_magnitudes_across_layers():
    weights = {"a": torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, 6.0, -0.1], [7.0, 8.0, 9.0]])}
    # 9 weights, step 0.4 -> ceil(3.6) = 4 zeros: |w| 0.1, 0.5, 1, 2 (two in each layer)
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.4))
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True, False], [True, True, True]]
    assert [(e.name, e.zeros_before, e.zeros_after) for e in log] == [("a", 0, 2), ("b", 0, 2)]


def test_a_layer_held_by_keep_rows_takes_its_next_best_group():
    weights = {"a": torch.tensor([[0.1, 0.2], [5.0, 6.0]]), "b": torch.tensor([[1.0, 2.0, 3.0]])}
    # ceil(0.4 * 7) = 3: globally 0.1, 0.2 (a, one row) and 1.0 (b); keep_rows keeps 0.2, a takes 5.0 instead
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.4, keep_rows=True))
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [[False, True, True]]
    assert all(e.note == "" for e in log)


def test_a_shortfall_no_layer_can_cover_itself_goes_to_the_other_layers():
    weights = {"a": torch.tensor([[0.1, 0.2]]), "b": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    # ceil(0.3 * 8) = 3: a may lose only one of its single row, so b loses 1.0 and then 2.0
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.3, keep_rows=True))
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [[False, False, True], [True, True, True]]
    assert log[0].note.startswith("constraints allowed 1 of 2") and log[1].zeros_after == 2


@pytest.mark.parametrize("keep", [False, True])
def test_every_global_round_zeros_ceil_step_times_kept_until_floor_target_times_total(keep):
    torch.manual_seed(0)
    weights = {"conv2": torch.randn(16, 6, 5, 5), "conv3": torch.randn(40, 16, 3, 3), "fc": torch.randn(10, 40)}
    masks = full(weights)
    total = sum(w.numel() for w in weights.values())
    target = math.floor(0.8 * total)
    zeros, history = 0, []
    for round_ in range(1, 12):
        masked = {n: w * masks[n] for n, w in weights.items()}
        new, log = prune_round(masked, masks, imp_settings(keep_rows=keep, keep_cols=keep), round_=round_)
        assert all(not (new[n] & ~masks[n]).any() for n in masks), "a pruned weight came back"
        after = sum(int((~m).sum()) for m in new.values())
        assert after - zeros == min(math.ceil(0.2 * (total - zeros)), target - zeros)
        assert after == sum(e.zeros_after for e in log) and after <= target
        zeros, masks = after, new
        history.append(zeros)
    assert history[-1] == target and history.count(target) == 4  # 0.8**7 = 0.21 kept: round 8 lands on 80%


def test_global_scope_refuses_block_patterns_and_balanced():
    weights = {"a": torch.randn(8, 8, 1, 1)}
    with pytest.raises(SparsifyError, match="needs pattern 'unstructured', not 'block'"):
        prune_round(weights, {"a": torch.ones(2, 2, dtype=torch.bool)}, imp_settings(pattern=BlockPattern(4, 4)))
    with pytest.raises(SparsifyError, match="balanced"):
        prune_round(weights, full(weights), imp_settings(balanced=True))
