"""Channel permutation: the network's function is unchanged, the kept magnitude never drops."""

import pytest
import torch
import torchvision
from torch import nn

from sparsify.models.builtin import tiny_resnet
from sparsify.core.elements import NMPattern
from sparsify.rounds.permsearch import kept_magnitude, search_permutation
from sparsify.rounds.channels import trace_channel_sets
from sparsify.rounds.permute import apply_permutation_, permute_model_
from sparsify.core.prune import find_layers


def tensors_of(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def randomise_batchnorm_(model):
    """Non-trivial running statistics, so a BatchNorm left unpermuted would change the output."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("arch, size, permutable", [
    ("resnet18", 32, 12), ("resnet50", 64, 37), ("mobilenet_v2", 32, 25), ("convnext_tiny", 64, 22),
])
def test_random_permutations_of_every_channel_set_keep_the_outputs(arch, size, permutable):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    randomise_batchnorm_(model)
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(example)
    sets = trace_channel_sets(model, example)
    free = [s for s in sets if not s.problem]
    assert len(free) == permutable
    assert all("model input" in s.problem for s in sets if s.problem)  # only the stem's input is pinned
    tensors = tensors_of(model)
    first = free[0].consumers[0]
    old = tensors[first].detach().clone()
    for s in free:
        apply_permutation_(s, tensors, torch.randperm(s.size))
    with torch.no_grad():
        after = model(example)
    assert (after - before).abs().max() < 1e-5 * max(1.0, before.abs().max())
    assert not torch.equal(tensors[first], old)  # the weights did move


def test_siblings_share_a_set_and_residual_adds_tie_producers():
    model = torchvision.models.resnet18().eval()
    sets = trace_channel_sets(model, torch.randn(1, 3, 32, 32))
    stage1 = next(s for s in sets if "layer1.0.conv1.weight" in s.consumers)
    # the stem's output and layer1's block outputs are one stream: read by 4 convs of layer1/layer2
    assert sorted(stage1.consumers) == ["layer1.0.conv1.weight", "layer1.1.conv1.weight",
                                        "layer2.0.conv1.weight", "layer2.0.downsample.0.weight"]
    assert stage1.producers == 3 and ("bn1.running_var", 0) in stage1.moves


def test_concatenation_and_untraceable_models_are_left_alone():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1), nn.Conv2d(32, 16, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    sets = trace_channel_sets(Cat(), torch.randn(1, 3, 4, 4))
    assert all(s.problem for s in sets)
    assert "cat" in next(s for s in sets if "c.weight" in s.consumers).problem

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x  # data-dependent control flow

    record = permute_model_(Branchy(), ["b.weight"], n=2, m=4, time_limit=1.0, example=torch.randn(1, 16, 4, 4))
    assert record["permuted"] == 0 and "cannot be traced by torch.fx" in record["layers"]["b.weight"]["reason"]


def test_the_search_finds_the_hand_checkable_best_order():
    row = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert kept_magnitude(row, n=2, m=4) == 2.0
    order, status = search_permutation(row, n=2, m=4, seconds=10.0)
    assert kept_magnitude(row[:, order], n=2, m=4) == 4.0 and status == "converged"
    assert sorted(order.tolist()) == list(range(8))
    order, status = search_permutation(torch.ones(3, 8), n=2, m=4, seconds=10.0)
    assert torch.equal(order, torch.arange(8))  # all equal: nothing to gain, identity kept


@pytest.mark.parametrize("seed", range(4))
def test_the_search_never_lowers_the_kept_magnitude(seed):
    torch.manual_seed(seed)
    x = torch.randn(24, 32).abs() ** 3
    order, _ = search_permutation(x, n=2, m=4, seconds=0.3, seed=seed)
    assert kept_magnitude(x[:, order], n=2, m=4) >= kept_magnitude(x, n=2, m=4)
    assert sorted(order.tolist()) == list(range(32))


def test_permute_model_keeps_outputs_and_gains_on_every_set():
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=16, in_channels=3).eval()  # small sets: the search has time under load
    for p in model.parameters():  # heavy-tailed weights: 2:4 loses a lot, a good order wins some back
        p.data = p.data.sign() * p.data.abs() ** 2
    randomise_batchnorm_(model)
    example = torch.randn(2, 3, 32, 32)
    eligible = [layer.name for layer in find_layers(model, NMPattern(), include_linear=True, exclude=[])
                if layer.reason is None]
    with torch.no_grad():
        before = model(example)
    rows = {n: dict(model.named_parameters())[n].detach().abs().movedim(1, -1).reshape(-1, dict(
        model.named_parameters())[n].shape[1]) for n in eligible}
    record = permute_model_(model, eligible, n=2, m=4, time_limit=5.0, example=example)
    with torch.no_grad():
        after = model(example)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)
    assert record["eligible"] == len(eligible) and record["permuted"] > 0
    layers = record["layers"]
    assert sum(layers[n]["kept_after"] for n in eligible) >= sum(layers[n]["kept_before"] for n in eligible)
    for name in eligible:  # the record matches the weights that were saved
        assert layers[name]["kept_before"] == pytest.approx(kept_magnitude(rows[name], n=2, m=4), abs=1e-4)
