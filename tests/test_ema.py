"""ModelEma: the averaging rule, the update cadence, masked weights staying exactly zero, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify.training.ema import ModelEma
from sparsify.errors import SparsifyError
from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.models.build import build_model
from sparsify.core.block import BlockPattern
from sparsify.core.prune import PruneSettings, find_layers, prune_round


def test_update_blends_weights_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.train()
    model(torch.randn(4, 3))  # moves the running stats, counts a batch
    assert ema.update(model, step=0)
    state, now = ema.state_dict(), model.state_dict()
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(state[key], 0.75 * before[key] + 0.25 * now[key]), key
    assert state["1.num_batches_tracked"].item() == 1
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_update_only_every_n_steps():
    model = nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.5, every=3)
    with torch.no_grad():
        model.weight.fill_(2.0)
    start = ema.module.weight.clone()
    assert [ema.update(model, step) for step in (1, 2)] == [False, False]
    assert torch.equal(ema.module.weight, start)
    assert ema.update(model, 3)
    assert torch.allclose(ema.module.weight, 0.5 * start + 1.0)


def masked_tiny_resnet():
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10, in_channels=3)
    pattern = BlockPattern(8, 8)
    names = [l.name for l in find_layers(model, pattern, include_linear=True, exclude=[]) if l.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.5)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, names, pattern), settings)
    enforcer = MaskEnforcer(model, masks, pattern)
    enforcer.apply_()
    return model, masks, pattern, enforcer


def test_masked_weights_of_the_average_stay_exactly_zero():
    model, masks, pattern, enforcer = masked_tiny_resnet()
    ema = ModelEma(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    for step in range(1, 6):
        model.train()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.mask_grads_()
        optimizer.step()
        enforcer.apply_()
        ema.update(model, step)
    state = ema.state_dict()
    for name, mask in masks.items():
        element = pattern.expand(mask, tuple(state[name].shape))
        assert bool((state[name][~element] == 0).all()), name  # exactly zero where pruned
        assert not torch.equal(state[name][element], start[name][element]), name  # kept ones moved
    # evaluation with the averaged weights: the EMA copy is a plain module in eval mode
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(ema.module(x), model(x))


def test_state_dict_round_trip_and_copy_to():
    model, _, _, _ = masked_tiny_resnet()
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    ema.update(model, 0)
    other = ModelEma(build_model("tiny_resnet", num_classes=10, in_channels=3), decay=0.5)
    other.load_state_dict(ema.state_dict())
    for key, value in ema.state_dict().items():
        assert torch.equal(other.module.state_dict()[key], value), key
    target = build_model("tiny_resnet", num_classes=10, in_channels=3)
    other.copy_to_(target)
    assert torch.equal(target.fc.weight, ema.module.fc.weight)
    wrong = ModelEma(build_model("small_resnet", num_classes=10, in_channels=3), decay=0.5)
    with pytest.raises(SparsifyError, match="EMA state does not fit the model"):
        wrong.load_state_dict(ema.state_dict())


def test_bad_settings_are_refused():
    with pytest.raises(SparsifyError, match=r"EMA decay must be in \[0, 1\), got 1.0"):
        ModelEma(nn.Linear(1, 1), decay=1.0)
    with pytest.raises(SparsifyError, match="EMA every must be at least 1 step, got 0"):
        ModelEma(nn.Linear(1, 1), decay=0.9, every=0)
