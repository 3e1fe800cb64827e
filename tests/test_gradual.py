"""Gradual pruning: the cubic schedule, and the sparsity after each pruning step within one group."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsify.config import load_config
from sparsify.errors import SparsifyError
from sparsify.methods.gradual import GradualCallbacks, cubic_sparsity, is_pruning_step, schedule_steps
from sparsify.core.masks import MaskEnforcer
from sparsify.core.patterns import build_pattern


def test_cubic_schedule_by_hand():
    kwargs = dict(initial=0.0, target=0.8, start=10, end=20)
    assert cubic_sparsity(0, **kwargs) == 0.0
    assert cubic_sparsity(10, **kwargs) == 0.0
    assert cubic_sparsity(15, **kwargs) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)  # 0.7
    assert cubic_sparsity(20, **kwargs) == 0.8
    assert cubic_sparsity(99, **kwargs) == 0.8


def test_pruning_steps_are_start_every_frequency_and_end():
    steps = [t for t in range(30) if is_pruning_step(t, start=4, end=14, frequency=4)]
    assert steps == [4, 8, 12, 14]


def test_end_before_start_is_refused():
    with pytest.raises(SparsifyError, match="must come after start"):
        schedule_steps(2.0, 1.0, steps_per_epoch=10)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("pattern", [{"type": "unstructured"}, {"type": "block", "block": [4, 4]}])
def test_sparsity_after_each_pruning_step_follows_the_cubic_formula(pattern):
    torch.manual_seed(0)
    config = load_config(None, [f"sparsity.pattern={pattern}", "sparsity.method=gradual",
                                "sparsity.criterion=l1", "sparsity.target=0.75", "sparsity.keep_rows=false",
                                "sparsity.keep_cols=false", "sparsity.gradual.initial=0.1",
                                "sparsity.gradual.start=0.5", "sparsity.gradual.end=2",
                                "sparsity.gradual.frequency=3"])
    context = SimpleNamespace(sparsity=config.sparsity, eligible=["conv1.weight", "conv2.weight"],
                              parent_meta={}, seed=0, extra={"steps_per_epoch": 10})
    model = Net()
    pat = build_pattern(config.sparsity.pattern.model_dump())
    enforcer = MaskEnforcer(model, {}, pat)
    callbacks = GradualCallbacks(context)
    assert (callbacks.start, callbacks.end) == (5, 20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    callbacks.on_train_start(model, enforcer)
    previous = {n: m.clone() for n, m in enforcer.masks.items()}
    for step in range(1, 26):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 5, 5)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        enforcer.mask_grads_()
        optimizer.step()
        enforcer.apply_()
        callbacks.after_step(step, 0, model, enforcer)
        for name, mask in enforcer.masks.items():
            assert not bool((mask & ~previous[name]).any())  # masks only shrink
            previous[name] = mask.clone()
        if is_pruning_step(step, start=5, end=20, frequency=3):
            scheduled = cubic_sparsity(step, initial=0.1, target=0.75, start=5, end=20)
            for name, mask in enforcer.masks.items():
                zeros = int((~mask).sum())
                assert abs(zeros / mask.numel() - scheduled) <= 1 / mask.numel() + 1e-9
                weight = dict(model.named_parameters())[name]
                assert bool((weight.detach()[~pat.expand(mask, tuple(weight.shape))] == 0).all())
    assert [entry[0] for entry in callbacks.log] == [5, 8, 11, 14, 17, 20]
    assert callbacks.log[0][1] == pytest.approx(0.1)
    assert callbacks.log[-1][1] == pytest.approx(0.75)
    assert callbacks.stage_meta()["gradual_step"] == 25
    for name, mask in enforcer.masks.items():
        assert int((~mask).sum()) == math.floor(0.75 * mask.numel())


def test_schedule_continues_from_the_parent_checkpoint_step():
    config = load_config(None, ["sparsity.method=gradual", "sparsity.pattern.type=unstructured",
                                "sparsity.criterion=l1", "sparsity.gradual.frequency=2"])
    context = SimpleNamespace(sparsity=config.sparsity, eligible=["conv2.weight"], seed=0,
                              parent_meta={"method_state": {"gradual_step": 4, "gradual_last_pruned": 4}},
                              extra={"steps_per_epoch": 10})
    model = Net()
    enforcer = MaskEnforcer(model, {}, build_pattern({"type": "unstructured"}))
    callbacks = GradualCallbacks(context)
    callbacks.on_train_start(model, enforcer)
    assert callbacks.log == []  # step 4 was pruned by the stage before
    callbacks.after_step(1, 0, model, enforcer)
    callbacks.after_step(2, 0, model, enforcer)
    assert [entry[0] for entry in callbacks.log] == [6]
