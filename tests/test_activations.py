"""Sparse activations: exact densities, sparse BatchNorm statistics over kept positions only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify.methods.activations import attach_activation_masks_, checkerboard, densities, random_position_mask
from sparsify.errors import SparsifyError


def test_checkerboard_quarters_by_hand():
    assert checkerboard(2, 4, quarters=1).int().tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]]
    assert checkerboard(2, 4, quarters=2).int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert checkerboard(2, 4, quarters=3).int().tolist() == [[1, 1, 1, 1], [0, 1, 0, 1]]
    assert bool(checkerboard(2, 4, quarters=4).all())


@pytest.mark.parametrize("quarters", [1, 2, 3])
def test_random_masks_keep_exactly_q_quarters(quarters):
    mask = random_position_mask(6, 10, quarters=quarters, generator=torch.Generator().manual_seed(1))
    assert int(mask.sum()) == round(quarters * 60 / 4)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


@pytest.mark.parametrize("kind", ["checkerboard", "static", "dynamic"])
@pytest.mark.parametrize("quarters", [1, 2, 3])
def test_measured_density_equals_q_over_4(kind, quarters):
    torch.manual_seed(0)
    model = Block()
    sites = attach_activation_masks_(model, sites=["bn1", "conv1"], kind=kind, quarters=quarters,
                                     sparse_bn=True, dense_inference=False, seed=3)
    model.train()
    model(torch.randn(4, 2, 8, 8))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 2, 8, 8))
    for name, found in densities(sites).items():
        assert found["mask_density"] == quarters / 4, name
        assert found["measured_density"] == quarters / 4, name


def test_sparse_batchnorm_statistics_use_kept_positions_only():
    model = Block()
    attach_activation_masks_(model, sites=["bn1"], kind="checkerboard", quarters=2, sparse_bn=True,
                             dense_inference=False, seed=0)
    x = torch.randn(5, 3, 4, 4)
    x[:, :, 0, 1] = 1000.0  # a dropped position of the checkerboard: must not move the statistics
    keep = checkerboard(4, 4, quarters=2)
    bn = model.bn1.train()
    out = bn(x)
    kept = x[:, :, keep]  # (N, C, K)
    mean = kept.mean((0, 2))
    var = kept.var((0, 2), unbiased=False)
    expected = (kept - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    assert torch.allclose(out[:, :, keep], expected, atol=1e-5)
    assert bool((out[:, :, ~keep] == 0).all())
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-6)
    n = kept.shape[0] * kept.shape[2]
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1), atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_dense_inference_scales_by_the_density():
    model = Block()
    attach_activation_masks_(model, sites=["conv1"], kind="static", quarters=1, sparse_bn=False,
                             dense_inference=True, seed=0)
    plain = Block()
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert torch.allclose(model.conv1(x), 0.25 * plain.conv1(x))


def test_static_masks_repeat_with_the_seed_and_dynamic_ones_change():
    def masks(kind, seed):
        model = Block()
        attach_activation_masks_(model, sites=["conv1"], kind=kind, quarters=2, sparse_bn=False,
                                 dense_inference=False, seed=seed)
        x = torch.ones(1, 2, 6, 6)
        return [model.conv1(x)[0, 0].ne(0) for _ in range(2)]
    first, second = masks("static", 5), masks("static", 5)
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], second[0])
    moving = masks("dynamic", 5)
    assert not torch.equal(moving[0], moving[1])


def test_a_glob_that_matches_nothing_is_refused():
    with pytest.raises(SparsifyError, match="matches no module"):
        attach_activation_masks_(Block(), sites=["layer9.*"], kind="static", quarters=2, sparse_bn=True,
                                 dense_inference=False, seed=0)
