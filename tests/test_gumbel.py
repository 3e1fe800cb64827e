"""Learned 2:4 masks: exact 2:4 in evaluation and checkpoints, frozen patterns, resumable logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsify.core.elements import UnstructuredPattern
from sparsify.core.masks import MaskEnforcer
from sparsify.errors import CheckpointError
from sparsify.io.checkpoint import load_checkpoint, save_checkpoint
from sparsify.methods.gumbel import (
    LOGITS_PREFIX,
    PRUNED_PREFIX,
    GumbelCallbacks,
    GumbelMask,
    GumbelOptions,
    attach_gumbel_,
    detach_gumbel_,
    from_gumbel_groups,
    magnitude_logits,
    sample_choice,
    set_trainable_,
    to_gumbel_groups,
    two_of_four_patterns,
)


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def groups_of_four_along_cin(mask: torch.Tensor) -> torch.Tensor:
    """(COUT, CIN, kh, kw) -> kept count of every 4 consecutive input channels."""
    cout, cin = mask.shape[:2]
    return mask.movedim(1, -1).reshape(-1, cin // 4, 4).sum(-1)


def test_the_six_patterns_keep_two_of_four_and_differ():
    patterns = two_of_four_patterns()
    assert patterns.shape == (6, 4)
    assert patterns.sum(1).tolist() == [2.0] * 6
    assert len({tuple(row.tolist()) for row in patterns}) == 6


def test_channel_groups_run_along_input_channels():
    weight = torch.arange(16.0).reshape(1, 8, 1, 2)  # (cout, cin, kh, kw)
    groups = to_gumbel_groups(weight, "channels")
    assert groups[0].tolist() == [0.0, 2.0, 4.0, 6.0]  # cin 0..3 at (kh 0, kw 0)
    assert groups[1].tolist() == [8.0, 10.0, 12.0, 14.0]  # cin 4..7 at (kh 0, kw 0)
    assert groups[2].tolist() == [1.0, 3.0, 5.0, 7.0]  # cin 0..3 at (kw 1)
    assert torch.equal(from_gumbel_groups(groups, weight.shape, grouping="channels"), weight)
    flat = to_gumbel_groups(weight, "flat")
    assert flat[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(from_gumbel_groups(flat, weight.shape, grouping="flat"), weight)


def test_training_samples_are_exact_zero_one_masks_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(50, 6, requires_grad=True)
    choice = sample_choice(logits, tau=0.7)
    assert set(choice.unique().tolist()) <= {0.0, 1.0}
    assert choice.sum(1).tolist() == [1.0] * 50
    (choice * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_evaluation_mask_is_the_argmax_pattern_and_deterministic():
    logits = torch.zeros(2, 6)
    logits[0, 5] = 3.0  # pattern 1100
    logits[1, 1] = 3.0  # pattern 0101
    mask = GumbelMask((1, 8), grouping="channels", logits=logits).eval()
    assert mask().tolist() == [[1, 1, 0, 0, 0, 1, 0, 1]]
    assert torch.equal(mask(), mask())
    assert torch.equal(mask.hard_mask(), mask().bool())


def test_magnitude_init_favours_the_magnitude_pattern():
    weight = torch.tensor([[0.1, -3.0, 0.2, 2.0]])
    mask = GumbelMask((1, 4), grouping="channels", logits=magnitude_logits(weight, grouping="channels")).eval()
    assert mask().tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_pattern_buffer_never_changes_and_model_state_dict_stays_vanilla():
    torch.manual_seed(0)
    model = TwoConvs()
    vanilla_keys = list(model.state_dict())
    attached = attach_gumbel_(model, ["conv2.weight"], grouping="channels", tau=1.0)
    set_trainable_(model, "mask")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["conv2.gumbel_mask.logits"]
    start = attached["conv2.weight"].logits.detach().clone()
    weight = model.conv2.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mask = attached["conv2.weight"]
    assert torch.equal(mask.patterns, two_of_four_patterns())
    assert not torch.equal(mask.logits.detach(), start)
    assert torch.equal(model.conv2.weight, weight)
    detach_gumbel_(model)
    assert list(model.state_dict()) == vanilla_keys
    assert "forward" not in model.conv2.__dict__


def fake_context(eligible, *, parent_tensors=None, steps=0, trainable="mask"):
    return SimpleNamespace(sparsity=SimpleNamespace(gumbel=GumbelOptions(tau=1.0, anneal=0.5, tau_min=0.5)),
                           eligible=eligible, parent_meta={"method_state": {"gumbel_steps": steps}}, seed=0,
                           extra={"trainable": trainable, "parent_tensors": parent_tensors or {}})


def run_stage(model, callbacks, enforcer, steps=3):
    callbacks.on_train_start(model, enforcer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        enforcer.mask_grads_()
        optimizer.step()
        enforcer.apply_()
        callbacks.after_step(step, 0, model, enforcer)
    callbacks.on_train_end(model, enforcer)


def test_saved_masks_are_exactly_two_of_four_and_resume_continues_the_logits(tmp_path):
    torch.manual_seed(0)
    model = TwoConvs()
    dense = model.conv2.weight.detach().clone()
    enforcer = MaskEnforcer(model, {}, UnstructuredPattern())
    first = GumbelCallbacks(fake_context(["conv1.weight", "conv2.weight"]))
    run_stage(model, first, enforcer)
    assert list(enforcer.masks) == ["conv2.weight"]  # conv1 has 1 input channel: not 2:4-able
    mask = enforcer.masks["conv2.weight"]
    assert groups_of_four_along_cin(mask).unique().tolist() == [2]
    assert torch.equal(model.conv2.weight, dense * mask)  # mask-only: kept weights unchanged
    assert first.stage_meta()["gumbel_steps"] == 3
    assert first.stage_meta()["gumbel_tau"] == pytest.approx(max(0.5, torch.exp(torch.tensor(-1.5)).item()))

    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model.state_dict(), enforcer.masks, {"pattern": {"type": "unstructured"}},
                    extra=first.stage_tensors())
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.masks["conv2.weight"], mask)
    logits = ckpt.extra[LOGITS_PREFIX + "conv2.weight"]
    assert ckpt.extra[PRUNED_PREFIX + "conv2.weight"].numel() == dense.numel() // 2

    resumed = TwoConvs()
    resumed.load_state_dict(ckpt.state)
    enforcer2 = MaskEnforcer(resumed, ckpt.masks, UnstructuredPattern())
    second = GumbelCallbacks(fake_context(["conv2.weight"], parent_tensors=ckpt.extra, steps=3))
    second.on_train_start(resumed, enforcer2)
    assert torch.equal(resumed.conv2.weight, dense)  # the zeroed half is back
    assert torch.equal(resumed.conv2.gumbel_mask.logits.detach(), logits)
    assert resumed.conv2.gumbel_mask.tau == pytest.approx(first.current_tau())
    assert bool(enforcer2.masks["conv2.weight"].all())  # the stochastic mask owns the layer while training


def test_inconsistent_gumbel_tensors_are_refused(tmp_path):
    model = TwoConvs()
    mask = torch.ones_like(model.conv2.weight, dtype=torch.bool)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, model.state_dict(), {"conv2.weight": mask}, {"pattern": {"type": "unstructured"}},
                    extra={LOGITS_PREFIX + "conv2.weight": torch.zeros(3, 6)})
    with pytest.raises(CheckpointError, match="needs"):
        load_checkpoint(path)
