"""Channel permutation: the network's function is unchanged, the kept magnitude never drops, and the
same seed and budget give the same order on a fast or a slow machine (DESIGN invariant 6)."""

import copy
import json
import time
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

from sparsify.config import PermuteConfig, SparsityConfig
from sparsify.models.builtin import tiny_resnet
from sparsify.core.elements import NMPattern
from sparsify.errors import TargetReached
from sparsify.rounds import permsearch
from sparsify.rounds.permsearch import kept_magnitude, search_permutation
from sparsify.graph.channels import trace_channel_sets
from sparsify.rounds.permute import DEFAULT_MAX_ITERATIONS, apply_permutation_, describe_permutation, permute_model_
from sparsify.core.prune import find_layers
from sparsify.stages.prune import refuse_at_target


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
    order, status, used = search_permutation(row, n=2, m=4, iterations=1000)
    assert kept_magnitude(row[:, order], n=2, m=4) == 4.0 and status == "converged"
    assert sorted(order.tolist()) == list(range(8))
    assert used >= 1 + 2 * permsearch.ESCAPES  # a batch (the only pair), then each escape and a batch after it
    assert search_permutation(row, n=2, m=4, iterations=used).status == "converged"
    assert search_permutation(row, n=2, m=4, iterations=used - 1)[1:] == ("budget spent", used - 1)
    order, status, _ = search_permutation(torch.ones(3, 8), n=2, m=4, iterations=1000)
    assert torch.equal(order, torch.arange(8)) and status == "converged"  # all equal: identity kept
    sparse_already = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert search_permutation(sparse_already, n=2, m=4, iterations=1000)[1:] == ("nothing to gain", 0)


@pytest.mark.parametrize("seed", range(4))
def test_the_search_never_lowers_the_kept_magnitude(seed):
    torch.manual_seed(seed)
    x = torch.randn(24, 32).abs() ** 3
    order, _, used = search_permutation(x, n=2, m=4, iterations=40, seed=seed)
    assert used == 40
    assert kept_magnitude(x[:, order], n=2, m=4) >= kept_magnitude(x, n=2, m=4)
    assert sorted(order.tolist()) == list(range(32))


def test_permute_model_keeps_outputs_and_gains_on_every_set(one_thread):
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
    record = permute_model_(model, eligible, n=2, m=4, max_iterations=300, example=example)
    with torch.no_grad():
        after = model(example)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)
    assert record["eligible"] == len(eligible) and record["permuted"] > 0
    layers = record["layers"]
    assert sum(layers[n]["kept_after"] for n in eligible) >= sum(layers[n]["kept_before"] for n in eligible)
    for name in eligible:  # the record matches the weights that were saved
        assert layers[name]["kept_before"] == pytest.approx(kept_magnitude(rows[name], n=2, m=4), abs=1e-4)


@pytest.fixture
def one_thread():
    """Library calls at one torch thread, as the CLI runs them on 2 CPUs (two threads stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def slowed_search_(monkeypatch, seconds: float) -> None:
    """Every batch of candidate pairs takes `seconds` longer (a real sleep: a slow or loaded machine)."""
    evaluate = permsearch.evaluate_pairs

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(permsearch, "evaluate_pairs", slow)


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator).abs() ** 3


def test_same_seed_and_budget_give_the_same_order_on_a_slow_machine(monkeypatch, one_thread):
    x = heavy_tailed(96, 64, 0)
    fast = search_permutation(x, n=2, m=4, iterations=40, seconds=60.0, seed=3)
    slowed_search_(monkeypatch, 0.02)
    started = time.perf_counter()
    slow = search_permutation(x, n=2, m=4, iterations=40, seconds=60.0, seed=3)
    slow_seconds = time.perf_counter() - started
    torch.set_num_threads(2)  # another split of the sums over threads
    two_threads = search_permutation(x, n=2, m=4, iterations=40, seconds=60.0, seed=3)
    torch.set_num_threads(1)
    monkeypatch.undo()
    assert slow_seconds > 0.5  # really slowed: 40 iterations, most of them 20 ms longer (a few are escapes)
    assert torch.equal(two_threads.order, fast.order)
    assert (fast.status, fast.iterations) == (slow.status, slow.iterations) == ("budget spent", 40)
    assert torch.equal(fast.order, slow.order) and not torch.equal(fast.order, torch.arange(64))
    other = search_permutation(x, n=2, m=4, iterations=40, seed=4)
    assert not torch.equal(other.order, fast.order)  # the seed does steer the search


def tiny_model_and_layers():
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=16, in_channels=3).eval()
    for p in model.parameters():
        p.data = p.data.sign() * p.data.abs() ** 2
    eligible = [layer.name for layer in find_layers(model, NMPattern(), include_linear=True, exclude=[])
                if layer.reason is None]
    return model, eligible


def test_the_budget_is_split_by_iterations_not_by_the_clock(monkeypatch, one_thread):
    model, eligible = tiny_model_and_layers()
    slowed = copy.deepcopy(model)
    example = torch.randn(1, 3, 32, 32)
    record = permute_model_(model, eligible, n=2, m=4, max_iterations=200, time_limit=100.0, example=example, seed=1)
    slowed_search_(monkeypatch, 0.01)
    slow_record = permute_model_(slowed, eligible, n=2, m=4, max_iterations=200, time_limit=100.0, example=example,
                                 seed=1)
    assert slow_record["seconds"] > record["seconds"] + 1.0  # 200 batches and escapes, most of them slept
    for a, b in zip(model.state_dict().values(), slowed.state_dict().values()):
        assert torch.equal(a, b)
    assert record["layers"] == slow_record["layers"]
    assert record["iterations"] == slow_record["iterations"] == 200 and not record["cut_by_time_limit"]
    endings = {entry["search"] for entry in record["layers"].values()}
    assert endings <= {"converged", "budget spent", "nothing to gain"} and "budget spent" in endings


def test_a_time_limit_cut_is_recorded_and_named_with_the_fix(monkeypatch, one_thread):
    model, eligible = tiny_model_and_layers()
    slowed_search_(monkeypatch, 0.05)  # 100,000 iterations would take hours
    record = permute_model_(model, eligible, n=2, m=4, max_iterations=100_000, time_limit=1.0,
                            example=torch.randn(1, 3, 32, 32))
    assert record["cut_by_time_limit"] is True and 0 < record["iterations"] < 100
    assert "time limit" in {entry.get("search") for entry in record["layers"].values()}
    text = describe_permutation(record)
    assert "CUT by time_limit (1 s)" in text and "will not repeat elsewhere" in text
    assert "raise sparsity.permute.time_limit or lower max_iterations" in text
    monkeypatch.undo()
    uncut = permute_model_(*tiny_model_and_layers(), n=2, m=4, max_iterations=20, example=torch.randn(1, 3, 32, 32))
    assert uncut["cut_by_time_limit"] is False and "CUT" not in describe_permutation(uncut)
    assert f"{uncut['iterations']}/20 iterations" in describe_permutation(uncut)


def test_the_config_default_budget_is_the_library_default():
    assert PermuteConfig().max_iterations == DEFAULT_MAX_ITERATIONS
    assert PermuteConfig().time_limit >= 60  # a safety, far above what the default budget takes


NM_PERMUTED = {"sparsity": {"pattern": {"type": "nm"}, "permute": {"enabled": True, "max_iterations": 150}}}


def checkpoint_tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def test_two_prune_runs_with_the_same_seed_write_byte_equal_masks_and_weights(tiny_config, cli, monkeypatch):
    outputs = {}
    for name, slow in (("fast", 0.0), ("slow", 0.005)):
        config = tiny_config(name=name, **NM_PERMUTED)
        assert cli("download", "-c", config)[0] == 0
        with monkeypatch.context() as patch:
            if slow:
                slowed_search_(patch, slow)
            code, out, err = cli("prune", "-c", config)
        assert code == 0, out + err
        assert "permutation: searching input-channel orders (150 iterations" in err
        assert "layers permuted" in out and "150/150 iterations" in out and "CUT" not in out
        outputs[name] = checkpoint_tensors(Path("runs", name, "checkpoints", "001-r01-pruned.safetensors"))
    (fast, fast_meta), (slow, slow_meta) = outputs["fast"], outputs["slow"]
    assert fast.keys() == slow.keys() and any(key.startswith("mask.") for key in fast)
    for key in fast:
        assert fast[key].dtype == slow[key].dtype and fast[key].numpy().tobytes() == slow[key].numpy().tobytes(), key
    record = json.loads(fast_meta["permutation"])
    assert record["permuted"] > 0 and record["iterations"] == 150 and record["cut_by_time_limit"] is False
    assert json.loads(slow_meta["permutation"])["layers"] == record["layers"]


def test_a_run_at_its_target_stops_before_the_search(tiny_config, cli):
    config = tiny_config(**NM_PERMUTED)
    assert cli("download", "-c", config)[0] == 0
    code, _, err = cli("prune", "-c", config)
    assert code == 0 and "permutation: searching" in err
    checkpoints = sorted(Path("runs", "tiny", "checkpoints").iterdir())
    code, out, err = cli("prune", "-c", config)
    assert code == 3 and "every eligible layer is at its target (50%)" in err
    assert "permutation" not in err + out  # no search, no record
    assert sorted(Path("runs", "tiny", "checkpoints").iterdir()) == checkpoints


def test_the_target_check_reads_the_masks_only():
    weights = {"w": torch.randn(8, 16, 3, 3)}
    full = {"w": torch.ones(8, 16, 3, 3, dtype=torch.bool)}
    settings = SparsityConfig(pattern={"type": "nm"})
    refuse_at_target(full, weights, NMPattern(2, 4), settings)  # room left: no refusal
    half = {"w": NMPattern(2, 4).select(weights["w"].abs(), full["w"])}
    with pytest.raises(TargetReached, match="every eligible layer is at its target"):
        refuse_at_target(half, weights, NMPattern(2, 4), settings)


def test_the_target_check_comes_before_every_hook(tiny_config, cli, tmp_path):
    """Taylor saliency reads training batches in its hook: at the target, prune exits 3 without them."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = np.random.default_rng(i).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    config = tiny_config(model={"num_classes": 2, "input_size": 16},
                         data={"dataset": "imagefolder", "root": str(root), "batch_size": 4, "workers": 0},
                         sparsity={"pattern": {"type": "unstructured"}, "criterion": "taylor", "criterion_batches": 1,
                                   "target": 0.5, "step": 1.0})
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("prune", "-c", config)
    assert code == 0, out + err
    shutil.rmtree(root)  # the hook could no longer read a batch
    code, out, err = cli("prune", "-c", config)
    assert code == 3 and "every eligible layer is at its target (50%)" in err, out + err


def test_a_cut_is_in_the_prune_line_the_checkpoint_and_the_report(tiny_config, cli, monkeypatch):
    config = tiny_config(**NM_PERMUTED)
    assert cli("download", "-c", config)[0] == 0
    with monkeypatch.context() as patch:
        slowed_search_(patch, 0.05)  # the first batch alone outlasts the limit
        code, out, err = cli("prune", "-c", config, "--set", "sparsity.permute.time_limit=0.01")
    assert code == 0, out + err
    assert "CUT by time_limit (0.01 s)" in out and "raise sparsity.permute.time_limit" in out
    _, meta = checkpoint_tensors(Path("runs", "tiny", "checkpoints", "001-r01-pruned.safetensors"))
    record = json.loads(meta["permutation"])
    assert record["cut_by_time_limit"] is True and record["iterations"] < 150
    assert "CUT by time_limit" in cli("report", "-c", config)[1]
