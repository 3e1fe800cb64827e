"""Exact masks on hand-made tensors, and invariants over every registered pattern and criterion."""

import math

import pytest
import torch

from sparsify.core.criteria import CRITERIA, ScoreInputs, score_groups
from sparsify.errors import SparsifyError
from sparsify.core.block import BlockPattern
from sparsify.core.elements import UnstructuredPattern
from sparsify.core.patterns import PATTERNS, build_pattern
from sparsify.core.prune import PruneSettings, planned_count, prune_layer, select_zeros, target_zero_count


def block_weight(values):
    """A (2*R, 2*C, 1, 1) weight whose 2x2 block (r, c) holds [[0, v], [0, v]] (variance v^2/4)."""
    v = torch.tensor(values, dtype=torch.float32)
    rows, cols = v.shape
    w = torch.zeros(2 * rows, 2 * cols)
    w[:, 1::2] = v.repeat_interleave(2, 0)
    return w.reshape(2 * rows, 2 * cols, 1, 1)


def settings(**kw):
    base = dict(pattern=BlockPattern(2, 2), criterion="variance", target=0.5, step=0.5,
                step_basis="remaining", keep_rows=False, keep_cols=False, balanced=False)
    base.update(kw)
    return PruneSettings(**base)


def test_block_groups_cover_tail_blocks_with_their_true_size():
    pattern = BlockPattern(2, 2)
    assert pattern.mask_shape((5, 3, 3, 3)) == (3, 2)
    assert pattern.group_sizes((5, 3, 3, 3)).tolist() == [[36, 18], [36, 18], [18, 9]]
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    plane = pattern.expand(mask, (5, 3, 1, 1))[:, :, 0, 0]
    assert plane.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 1]]


def test_variance_is_the_population_variance_of_each_block_including_the_tail():
    w = torch.arange(15, dtype=torch.float32).reshape(5, 3, 1, 1)
    scores = score_groups("variance", w, BlockPattern(2, 2))
    # block (0,0) = [0,1,3,4] -> var 2.5; tail column (0,1) = [2,5] -> 2.25; corner (2,1) = [14] -> 0
    assert scores.tolist() == [[2.5, 2.25], [2.5, 2.25], [0.25, 0.0]]
    assert torch.allclose(score_groups("l1", w, BlockPattern(2, 2))[0], torch.tensor([2.0, 3.5], dtype=torch.float64))


def test_lowest_variance_blocks_go_first_without_constraints():
    w = block_weight([[1.0, 2.0], [3.0, 4.0]])
    mask, entry = prune_layer("w", w, torch.ones(2, 2, dtype=torch.bool), settings())
    assert mask.tolist() == [[False, False], [True, True]]
    assert (entry.zeros_before, entry.zeros_after, entry.planned) == (0, 2, 2)


def test_keep_rows_and_keep_cols_take_the_next_best_block():
    w = block_weight([[1.0, 2.0], [3.0, 4.0]])
    mask, entry = prune_layer("w", w, torch.ones(2, 2, dtype=torch.bool), settings(keep_rows=True, keep_cols=True))
    # (0,1) would empty row 0; (1,0) would then empty column 0; so (1,1) is taken
    assert mask.tolist() == [[False, True], [True, False]]
    assert entry.zeros_after == 2 and entry.note == ""


def test_constraints_that_block_the_count_are_reported():
    w = block_weight([[1.0, 2.0], [3.0, 4.0]])
    s = settings(target=0.75, step=1.0, keep_rows=True, keep_cols=True)
    mask, entry = prune_layer("w", w, torch.ones(2, 2, dtype=torch.bool), s)
    assert entry.planned == 3 and entry.zeros_after == 2
    assert "constraints allowed 2 of 3" in entry.note


def test_balanced_caps_zeros_per_output_block_and_sets_the_target():
    assert target_zero_count((3, 4), 0.5, balanced=True) == 6
    assert target_zero_count((3, 5), 0.5, balanced=True) == 6  # floor(2.5) per row
    assert target_zero_count((3, 5), 0.5, balanced=False) == 7
    w = block_weight([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    s = settings(step=1.0, balanced=True)
    mask, entry = prune_layer("w", w, torch.ones(2, 4, dtype=torch.bool), s)
    assert mask.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_step_basis_remaining_and_target_counts():
    assert planned_count(kept=100, zeros=0, target_zeros=50, step=0.2, basis="remaining") == 20
    assert planned_count(kept=64, zeros=36, target_zeros=50, step=0.2, basis="remaining") == 13
    assert planned_count(kept=51, zeros=49, target_zeros=50, step=0.2, basis="remaining") == 1
    assert planned_count(kept=100, zeros=0, target_zeros=50, step=0.2, basis="target") == 10
    assert planned_count(kept=60, zeros=40, target_zeros=50, step=0.2, basis="target") == 10
    assert planned_count(kept=50, zeros=50, target_zeros=50, step=0.2, basis="target") == 0
    assert planned_count(kept=10, zeros=0, target_zeros=5, step=0.01, basis="remaining") == 1


def test_rounds_zero_exactly_ceil_step_times_kept_until_the_target():
    torch.manual_seed(0)
    w = torch.randn(20, 20, 3, 3)
    mask = torch.ones(10, 10, dtype=torch.bool)
    zeros_per_round = []
    for _ in range(6):
        mask, entry = prune_layer("w", w * BlockPattern(2, 2).expand(mask, w.shape), mask,
                                  settings(step=0.2, keep_rows=True, keep_cols=True))
        zeros_per_round.append(entry.zeros_after)
    assert zeros_per_round == [20, 36, 49, 50, 50, 50]


def test_select_zeros_breaks_score_ties_by_position():
    scores = torch.zeros(2, 3).numpy()
    kept = torch.ones(2, 3, dtype=torch.bool).numpy()
    assert select_zeros(scores, kept, 2, row_cap=3, col_cap=2).tolist() == [[False, False, True], [True] * 3]


def test_variance_with_unstructured_is_refused_with_the_alternatives():
    with pytest.raises(SparsifyError, match="use criterion l1 or l2"):
        score_groups("variance", torch.ones(4, 4), UnstructuredPattern())


def pattern_specs():
    # one-round patterns (nm) reach their layout at once (step/target do not apply): see test_nm.py
    return [PATTERNS.get(name).example().spec() for name in PATTERNS.names() if not PATTERNS.get(name).one_round]


@pytest.mark.parametrize("spec", pattern_specs(), ids=lambda s: s["type"])
@pytest.mark.parametrize("criterion", CRITERIA.names())
@pytest.mark.parametrize("keep", [False, True])
def test_invariants_over_every_pattern_and_criterion(spec, criterion, keep):
    """Masks only shrink, each round zeros ceil(step*kept) when it can, the target is never passed."""
    pattern = build_pattern(spec)
    torch.manual_seed(1)
    w = torch.randn(12, 10, 3, 3)
    grad = torch.randn(12, 10, 3, 3)  # a stand-in loss gradient for criterion taylor
    mask = torch.ones(pattern.mask_shape(tuple(w.shape)), dtype=torch.bool)
    s = PruneSettings(pattern=pattern, criterion=criterion, target=0.6, step=0.3, keep_rows=keep, keep_cols=keep)
    target = target_zero_count(tuple(pattern.grid(mask).shape), 0.6, False)
    for _ in range(8):
        masked = w * pattern.expand(mask, tuple(w.shape))
        try:
            new, entry = prune_layer("w", masked, mask, s, inputs=ScoreInputs("w", taylor=(masked * grad).abs()))
        except SparsifyError:
            assert CRITERIA.get(criterion).needs_groups and not pattern.supports_variance
            return
        assert not (new & ~mask).any(), "a pruned group came back"
        kept = int(mask.sum())
        want = min(math.ceil(0.3 * kept - 1e-9), target - (mask.numel() - kept))
        got = entry.zeros_after - entry.zeros_before
        assert got == want or (entry.note and got < want), (got, want, entry.note)  # a constraint may only hold back
        assert entry.zeros_after <= target
        sizes = pattern.group_sizes(tuple(w.shape))
        assert int(pattern.expand(new, tuple(w.shape)).sum()) == int(sizes[new].sum())
        mask = new
    assert int(mask.numel() - mask.sum()) == target
