"""Criteria taylor and random: exact saliency on a hand-checkable model, seeded randomness."""

import pytest
import torch
from torch import nn

from sparsify.core.criteria import CRITERIA, ScoreInputs, accumulate_taylor, score_groups
from sparsify.errors import SparsifyError
from sparsify.core.block import BlockPattern
from sparsify.core.elements import UnstructuredPattern


def linear_logits_model():
    """1x1 conv 3 -> 2, rows [1, 1, -1] and [2, -1, 0] (logits 0 at x = (1, 2, 3)); BN in eval mode is identity."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2, eps=0.0), nn.Flatten())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, -1.0], [2.0, -1.0, 0.0]]).reshape(2, 3, 1, 1))
    return model


def batch(scale: float, label: int):
    return torch.tensor([1.0, 2.0, 3.0]).mul(scale).reshape(1, 3, 1, 1), torch.tensor([label])


def test_taylor_is_the_mean_over_batches_of_abs_weight_times_gradient():
    model = linear_logits_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # logits are 0, so dL/dz = softmax - onehot = (-0.5, 0.5) for label 0 and dL/dW = dL/dz x^T.
    # batch 1 (x):  |w*g| = [[0.5, 1, 1.5], [1, 1, 0]];  batch 2 (2x): twice that; batch 3 is past the limit.
    batches = [batch(1.0, 0), batch(2.0, 1), batch(10.0, 0)]
    saliency = accumulate_taylor(model, batches, names=["0.weight"], limit=2, device=torch.device("cpu"))
    expected = torch.tensor([[0.75, 1.5, 2.25], [1.5, 1.5, 0.0]], dtype=torch.float64).reshape(2, 3, 1, 1)
    assert torch.equal(saliency["0.weight"], expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model changed"
    assert model.training and all(p.grad is None for p in model.parameters())
    inputs = ScoreInputs("0.weight", taylor=saliency["0.weight"])
    weight = model[0].weight
    assert torch.equal(score_groups("taylor", weight, UnstructuredPattern(), inputs), expected)
    assert score_groups("taylor", weight, BlockPattern(1, 3), inputs).tolist() == [[1.5], [1.0]]


def test_taylor_without_gradients_and_without_batches_is_refused():
    with pytest.raises(SparsifyError, match="needs gradients for conv.weight"):
        score_groups("taylor", torch.ones(2, 2), UnstructuredPattern(), ScoreInputs("conv.weight"))
    with pytest.raises(SparsifyError, match="got no training batch"):
        accumulate_taylor(linear_logits_model(), [], names=["0.weight"], limit=4, device=torch.device("cpu"))


def test_random_scores_repeat_per_seed_round_and_layer_and_differ_otherwise():
    w = torch.zeros(8, 4, 3, 3)
    pattern = BlockPattern(2, 2)
    first = score_groups("random", w, pattern, ScoreInputs("a", seed=1, round=2))
    assert first.shape == (4, 2) and first.dtype == torch.float64
    assert torch.equal(first, score_groups("random", w, pattern, ScoreInputs("a", seed=1, round=2)))
    for other in (ScoreInputs("a", seed=2, round=2), ScoreInputs("a", seed=1, round=3), ScoreInputs("b", 1, 2)):
        assert not torch.equal(first, score_groups("random", w, pattern, other))
    element = score_groups("random", w, UnstructuredPattern(), ScoreInputs("a", seed=1))
    assert element.shape == w.shape and 0.0 <= float(element.min()) and float(element.max()) < 1.0


def test_every_criterion_gives_one_score_per_group():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    inputs = ScoreInputs("w", taylor=torch.rand(6, 5, 3, 3))
    for pattern in (BlockPattern(4, 2), UnstructuredPattern()):
        for name in CRITERIA.names():
            if name == "variance" and pattern.name == "unstructured":
                continue
            scores = score_groups(name, w, pattern, inputs)
            assert tuple(scores.shape) == tuple(pattern.mask_shape(tuple(w.shape))), name
            assert bool((scores >= 0).all()), name
