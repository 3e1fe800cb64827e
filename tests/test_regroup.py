"""Regroup: the dense-column rule, the partitioner, and masks that are exactly unions of blocks."""

import numpy as np
import pytest
import torch

from sparsify.errors import SparsifyError
from sparsify.core.block import BlockPattern
from sparsify.core.elements import UnstructuredPattern
from sparsify.rounds.regroup import (connectivity_cut, contiguous_partition, dense_columns, hypergraph_partition,
                              regroup_mask, regroup_masks)


def rows_from(width, *kept):
    mask = np.zeros((len(kept), width), dtype=bool)
    for r, cols in enumerate(kept):
        mask[r, list(cols)] = True
    return mask


def assert_union_of_blocks(result, shape):
    """Each block is all True, rows belong to one block at most, nothing is True outside the blocks."""
    union = np.zeros(shape, dtype=bool)
    seen_rows = set()
    for rows, cols in result.blocks:
        assert not seen_rows & set(rows.tolist()), "a row is in two blocks"
        seen_rows |= set(rows.tolist())
        assert result.mask[np.ix_(rows, cols)].all()
        union[np.ix_(rows, cols)] = True
    assert np.array_equal(union, result.mask)


def test_dense_columns_grow_until_wider_than_growth_times_every_rows_leftover():
    assert dense_columns(rows_from(4, {0, 1}, {0, 1, 2}), 1.5).tolist() == [0, 1, 2]
    # row 1 keeps 0..9, row 0 only 0..3: stop at the first i with i > 1.5 * (10 - (i + 1)), i.e. i = 6
    block = rows_from(12, range(4), range(10))
    assert dense_columns(block, 1.5).tolist() == list(range(7))
    assert dense_columns(rows_from(1, {0}), 1.5) is None  # a single column never satisfies 0 > 0


def test_regroup_of_a_hand_made_mask_finds_the_two_interleaved_blocks():
    a, b = {0, 1, 2}, {5, 6, 7}
    mask = rows_from(8, a | {4}, b, a - {1}, b, a, b, a, b)  # rows 0,2,4,6 read a; rows 1,3,5,7 read b
    result = regroup_mask(mask, clusters=2, growth=1.5, split_rows=32, min_rows=2)
    assert sorted((r.tolist(), c.tolist()) for r, c in result.blocks) == [
        ([0, 2, 4, 6], [0, 1, 2]), ([1, 3, 5, 7], [5, 6, 7])]
    stats = result.stats(mask)
    assert (stats["added"], stats["removed"], stats["blocks"]) == (1, 1, 2)  # (2, 1) filled, (0, 4) dropped
    assert stats["block_sizes"] == [[4, 3], [4, 3]] and result.cut == 0
    assert_union_of_blocks(result, mask.shape)


def test_small_clusters_are_dropped_large_ones_split_and_no_block_leaves_the_mask():
    mask = np.zeros((50, 6), dtype=bool)
    mask[:40, :3] = True
    mask[40:, 3:] = True
    given = lambda rows, parts: (np.arange(rows.shape[0]) >= 40).astype(np.int64)  # noqa: E731 (rows 0-39, 40-49)
    result = regroup_mask(mask, clusters=2, growth=1.5, split_rows=32, min_rows=16, partition=given)
    assert [(r.size, c.tolist()) for r, c in result.blocks] == [(32, [0, 1, 2]), (8, [0, 1, 2])]
    assert not result.mask[40:].any() and result.stats(mask)["removed"] == 30
    small = regroup_mask(mask[40:], clusters=2, min_rows=16)
    assert np.array_equal(small.mask, mask[40:]) and small.blocks == [] and "left as it was" in small.note


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_regrouped_random_masks_are_exactly_unions_of_row_by_column_blocks(density):
    rng = np.random.default_rng(3)
    mask = rng.random((64, 72)) < density
    mask[5] = False  # an empty row stays empty
    result = regroup_mask(mask, clusters=4, growth=1.5, split_rows=16, min_rows=4)
    assert result.blocks and not result.mask[5].any()
    assert_union_of_blocks(result, mask.shape)
    again = regroup_mask(mask, clusters=4, growth=1.5, split_rows=16, min_rows=4)
    assert np.array_equal(result.mask, again.mask), "regroup is not deterministic"


def test_the_partitioner_recovers_planted_clusters_that_the_row_order_hides():
    rng = np.random.default_rng(0)
    planted = np.repeat(np.arange(4), 16)
    columns = np.arange(64) // 16
    mask = (rng.random((64, 64)) < 0.05) | ((planted[:, None] == columns[None, :]) & (rng.random((64, 64)) < 0.7))
    order = rng.permutation(64)
    rows = mask[order]
    labels = hypergraph_partition(rows, 4)
    assert np.bincount(labels).tolist() == [16, 16, 16, 16]
    for part in range(4):
        assert len(set(planted[order][labels == part])) == 1, "a part mixes planted clusters"
    baseline = contiguous_partition(rows, 4)
    assert connectivity_cut(rows, labels, 4) < connectivity_cut(rows, baseline, 4)


def test_regroup_masks_keeps_conv_shapes_and_refuses_block_patterns():
    torch.manual_seed(0)
    masks = {"conv.weight": torch.rand(24, 4, 3, 3) < 0.3}
    new, stats = regroup_masks(masks, UnstructuredPattern(), clusters=3, growth=1.5, split_rows=32, min_rows=4)
    assert new["conv.weight"].shape == (24, 4, 3, 3) and new["conv.weight"].dtype == torch.bool
    assert stats[0]["parameter"] == "conv.weight" and stats[0]["blocks"] >= 1
    assert stats[0]["density_after"] == pytest.approx(float(new["conv.weight"].float().mean()), abs=1e-6)
    with pytest.raises(SparsifyError, match="needs pattern 'unstructured'"):
        regroup_masks(masks, BlockPattern(2, 2), clusters=3, growth=1.5, split_rows=32, min_rows=4)
