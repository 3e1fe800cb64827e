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


def test_a_resumed_stage_draws_the_dynamic_masks_the_whole_stage_would_have(tmp_path):
    from types import SimpleNamespace

    from sparsify.methods.activations import ActivationCallbacks
    from sparsify.training.state import TrainState, load_train_state, save_train_state

    cfg = SimpleNamespace(sites=["conv1", "bn1"], kind="dynamic", quarters=2, sparse_batchnorm=False,
                          dense_inference=False)
    x = torch.ones(1, 2, 6, 6)

    def callbacks_on_a_model():
        model, callbacks = Block(), ActivationCallbacks(cfg, seed=3)
        callbacks.prepare(model)
        return model, callbacks

    def draw(model, times):
        return [model.bn1(model.conv1(x))[0, 0].ne(0) for _ in range(times)]

    model, whole = callbacks_on_a_model()
    draw(model, 3)
    state = TrainState(start_checkpoint="c", start_sha256="s", config_hash="h", epochs=1, world_size=1,
                       parts={"callbacks": [whole.state_dict()]})
    save_train_state(tmp_path / "train-state.safetensors", state)
    expected = draw(model, 4)
    resumed_model, resumed = callbacks_on_a_model()
    resumed.load_state_dict(load_train_state(tmp_path / "train-state.safetensors").parts["callbacks"][0])
    assert all(torch.equal(a, b) for a, b in zip(draw(resumed_model, 4), expected))
    _, fresh = callbacks_on_a_model()  # without the state the stream starts over: other masks
    assert sorted(fresh.state_dict()) == ["bn1", "conv1"]
    assert not all(torch.equal(a, b) for a, b in zip(draw(callbacks_on_a_model()[0], 4), expected))
    static = ActivationCallbacks(SimpleNamespace(**{**vars(cfg), "kind": "static"}), seed=3)
    static.prepare(Block())
    assert static.state_dict() is None  # nothing random to keep
    with pytest.raises(SparsifyError, match="layer9"):
        resumed.load_state_dict({"layer9": whole.state_dict()["conv1"]})


def test_a_glob_that_matches_nothing_is_refused():
    with pytest.raises(SparsifyError, match="matches no module"):
        attach_activation_masks_(Block(), sites=["layer9.*"], kind="static", quarters=2, sparse_bn=True,
                                 dense_inference=False, seed=0)
