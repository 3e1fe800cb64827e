"""The nm pattern: exact n:m masks on hand-made tensors, eligibility, one-round rule, config defaults."""

import pytest
import torch
import torchvision
from torch import nn

from sparsify.config import load_config
from sparsify.errors import ConfigError, SparsifyError
from sparsify.core.masks import MaskEnforcer, find_unmasked_nonzeros
from sparsify.core.elements import NMPattern
from sparsify.core.patterns import build_pattern, describe_pattern, parse_pattern
from sparsify.core.prune import PruneSettings, find_layers, prune_layer, prune_round


def nm_settings(criterion="l1", n=2, m=4):
    return PruneSettings(pattern=NMPattern(n, m), criterion=criterion, target=0.5, step=0.2)


def test_linear_keeps_the_two_largest_magnitudes_of_every_four_inputs():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.0, 7.0, -6.0, 5.0],
                      [4.0, 4.0, 4.0, 4.0, -1.0, 0.0, 0.0, 2.0]])
    mask, entry = prune_layer("fc.weight", w, torch.ones(2, 8, dtype=torch.bool), nm_settings())
    # ties (row 1, first group) keep the lower input channels
    assert mask.int().tolist() == [[0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 0, 0, 1]]
    assert (entry.groups, entry.zeros_before, entry.zeros_after, entry.target_zeros) == (16, 0, 8, 8)


def test_conv_groups_run_along_input_channels_at_fixed_output_and_tap():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # tap 0: channels 2 and 3 win
    w[0, :, 0, 1] = torch.tensor([-9.0, 1.0, 8.0, 0.0])  # tap 1: channels 0 and 2 win
    mask, _ = prune_layer("conv.weight", w, torch.ones_like(w, dtype=torch.bool), nm_settings())
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [True, False, True, False]


def test_a_tail_of_fewer_than_m_channels_keeps_min_n_tail():
    pattern = NMPattern(2, 4)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # groups of 4 and a tail of 3
    mask = pattern.select(w.abs(), torch.ones(1, 7, dtype=torch.bool))
    assert mask.int().tolist() == [[0, 0, 1, 1, 0, 1, 1]]
    assert pattern.target_zeros((1, 7)) == 3
    assert pattern.target_zeros((3, 6, 3, 3)) == 3 * 9 * 2  # tail of 2 keeps both


def test_one_round_reaches_n_of_m_and_the_next_round_zeros_nothing():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 16, 3, 3), "b": torch.randn(16, 32)}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    settings = nm_settings(n=1, m=4)
    new, log = prune_round(weights, masks, settings)
    assert [e.zeros_after for e in log] == [8 * 16 * 9 * 3 // 4, 16 * 32 * 3 // 4]
    for name, w in weights.items():
        kept = (w * new[name]).ne(0).movedim(1, -1).reshape(-1, 4).sum(-1)
        assert kept.eq(1).all()
        assert NMPattern(1, 4).count_violations(w * new[name]).sum() == 0
    pruned = {n: w * new[n] for n, w in weights.items()}
    again, log2 = prune_round(pruned, new, settings)
    assert all(e.zeros_after == e.zeros_before for e in log2)
    assert all(torch.equal(again[n], new[n]) for n in new)


def test_variance_is_refused_for_nm():
    w = torch.randn(8, 16)
    with pytest.raises(SparsifyError, match="use criterion l1 or l2"):
        prune_layer("w", w, torch.ones_like(w, dtype=torch.bool), nm_settings("variance"))


def test_element_masks_work_with_the_enforcer_and_the_drift_guard():
    model = nn.Linear(16, 8, bias=False)
    pattern = NMPattern(2, 4)
    mask, _ = prune_layer("weight", model.weight.detach(), torch.ones(8, 16, dtype=torch.bool), nm_settings())
    MaskEnforcer(model, {"weight": mask}, pattern).apply_()
    state = {"weight": model.weight.detach().clone()}
    assert find_unmasked_nonzeros(state, {"weight": mask}, pattern) == []
    state["weight"][~mask] = state["weight"][~mask].clone().fill_(0.25)
    assert find_unmasked_nonzeros(state, {"weight": mask}, pattern) == ["weight"]


def test_resnet50_has_53_of_54_layers_eligible_as_in_asp():
    model = torchvision.models.resnet50()
    config = load_config(None, ["sparsity.pattern={type: nm, n: 2, m: 4}"])
    s = config.sparsity
    layers = find_layers(model, build_pattern(s.pattern.model_dump()), include_linear=s.include_linear,
                         exclude=s.exclude)
    out = [layer for layer in layers if layer.reason is not None]
    assert len(layers) == 54 and [layer.name for layer in out] == ["conv1.weight"]
    assert "CIN % 16" in out[0].reason


def test_depthwise_and_grouped_convs_are_not_eligible():
    pattern = NMPattern()
    assert "depthwise" in pattern.ineligible_reason(nn.Conv2d(32, 32, 3, groups=32), (32, 1, 3, 3))
    assert "grouped" in pattern.ineligible_reason(nn.Conv2d(32, 64, 3, groups=2), (64, 16, 3, 3))
    assert pattern.ineligible_reason(nn.Linear(16, 12), (12, 16)) is not None


def test_config_defaults_for_nm_and_the_keys_it_refuses():
    s = load_config(None, ["sparsity.pattern={type: nm}"]).sparsity
    assert (s.criterion, s.target, s.include_linear, s.permute.enabled) == ("l1", 0.5, True, False)
    assert load_config(None, ["sparsity.pattern={type: nm, n: 1, m: 4}"]).sparsity.target == 0.75
    s = load_config(None, ["sparsity.pattern={type: nm}", "sparsity.include_linear=false",
                           "sparsity.criterion=l2"]).sparsity
    assert (s.criterion, s.include_linear) == ("l2", False)
    for overrides, words in [
        (["sparsity.target=0.6"], "its target is 0.5"),
        (["sparsity.criterion=variance"], "use criterion l1"),
        (["sparsity.pattern={type: nm, n: 4, m: 4}"], "n < m"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["sparsity.pattern={type: nm}", *overrides])
    with pytest.raises(ConfigError, match="permute applies to pattern nm only"):
        load_config(None, ["sparsity.permute.enabled=true"])


def test_pattern_short_forms():
    assert parse_pattern("2:4") == {"type": "nm", "n": 2, "m": 4}
    assert parse_pattern("8x8") == {"type": "block", "block": [8, 8]}
    assert parse_pattern("unstructured") == {"type": "unstructured"}
    assert describe_pattern(parse_pattern("1:8")) == "1:8"
    for bad in ("4:2", "8x", "2:4:8", "blocks"):
        with pytest.raises(SparsifyError, match="N:M"):
            parse_pattern(bad)
