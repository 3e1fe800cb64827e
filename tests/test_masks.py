"""Invariant 1: masked weights are exactly 0.0 after every optimizer step, whatever the optimizer."""

import pytest
import torch
from torch import nn

from sparsify.core.masks import MaskEnforcer, find_unmasked_nonzeros
from sparsify.core.block import BlockPattern
from sparsify.training.trainer import OptimConfig, make_optimizer


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 3))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_weights_stay_zero_through_momentum_and_weight_decay(optimizer):
    model = tiny_net()
    pattern = BlockPattern(8, 8)
    cfg = OptimConfig(optimizer, lr=0.1, momentum=0.9, weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    x, y = torch.randn(8, 16, 4, 4), torch.randint(0, 3, (8,))
    for _ in range(3):  # build momentum / Adam moments on every weight while dense
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = {"0.weight": torch.tensor([[True, False], [False, True]]), "2.weight": torch.tensor([[True, True], [False, True]])}
    enforcer = MaskEnforcer(model, masks, pattern)
    enforcer.apply_()
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        enforcer.mask_grads_()
        for name, mask in masks.items():
            grad = dict(model.named_parameters())[name].grad
            assert grad.masked_select(~pattern.expand(mask, tuple(grad.shape))).eq(0).all()
        opt.step()
        enforcer.apply_()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        assert find_unmasked_nonzeros(state, masks, pattern) == []
    kept = pattern.expand(masks["0.weight"], (16, 16, 3, 3))
    assert model[0].weight.detach().masked_select(kept).ne(0).all(), "kept weights still train"


def test_drift_guard_names_the_layer():
    pattern = BlockPattern(8, 8)
    state = {"w": torch.ones(16, 16, 1, 1)}
    masks = {"w": torch.tensor([[True, False], [True, True]])}
    assert find_unmasked_nonzeros(state, masks, pattern) == ["w"]
    state["w"][:8, 8:] = 0
    assert find_unmasked_nonzeros(state, masks, pattern) == []
