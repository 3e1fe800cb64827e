"""Contract tests over the registries: every pattern, criterion, method, exporter, dataset and executor
registered when the package loads is held to the same rules, so a new entry gets these tests for free."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify.config import load_config
from sparsify.core.criteria import ScoreInputs, score_groups
from sparsify.core.masks import check_masks, full_masks
from sparsify.core.patterns import build_pattern
from sparsify.core.prune import PruneSettings, prune_round
from sparsify.errors import ConfigError, SparsifyError
from sparsify.io.checkpoint import load_checkpoint, save_checkpoint
from sparsify.registry import CRITERIA, DATASETS, EXECUTORS, EXPORTERS, METHODS, PATTERNS

PATTERN_NAMES, CRITERION_NAMES = PATTERNS.names(), CRITERIA.names()
METHOD_NAMES, EXPORTER_NAMES, DATASET_NAMES = METHODS.names(), EXPORTERS.names(), DATASETS.names()
EXECUTOR_NAMES = EXECUTORS.names()


def tiny_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.Flatten(), nn.LazyLinear(16))


def eligible(model: nn.Module, pattern) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters()
            if name.endswith("weight") and pattern.ineligible_reason(dict(model.named_modules())[name[:-7]],
                                                                     tuple(p.shape)) is None}


@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_pattern_shapes_spec_and_text_round_trip(name):
    pattern = PATTERNS.get(name).example()
    assert build_pattern(pattern.spec()) == pattern and pattern.spec()["type"] == name
    assert isinstance(pattern.describe(), str) and pattern.describe()
    for shape in [(32, 16, 3, 3), (16, 32, 1, 1), (16, 48)]:
        sizes = pattern.group_sizes(shape)
        assert tuple(sizes.shape) == tuple(pattern.mask_shape(shape)) and int(sizes.sum()) == torch.Size(shape).numel()
        full = torch.ones(pattern.mask_shape(shape), dtype=torch.bool)
        assert pattern.expand(full, shape).all()
        mask = torch.rand(pattern.mask_shape(shape), generator=torch.Generator().manual_seed(1)) < 0.5
        element = pattern.expand(mask, shape)
        assert torch.equal(pattern.group_sum(element.double()), sizes * mask)  # a group is kept or zeroed whole
        assert pattern.grid(mask).ndim == 2


@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_pattern_prunes_a_model_and_its_masks_survive_a_checkpoint(name, tmp_path):
    pattern = PATTERNS.get(name).example()
    model = tiny_layers()
    model(torch.zeros(1, 16, 5, 5))
    weights = eligible(model, pattern)
    assert weights, f"pattern {name}: no eligible layer in the tiny model"
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.5)
    masks, entries = prune_round(weights, full_masks(model, list(weights), pattern), settings)
    assert all(e.zeros_after > e.zeros_before for e in entries)
    for layer, mask in masks.items():
        weights[layer].data.mul_(pattern.expand(mask, tuple(weights[layer].shape)))
    check_masks(model.state_dict(), masks, pattern, source="contract")
    save_checkpoint(tmp_path / "c.safetensors", model.state_dict(), masks, {"pattern": pattern.spec(), "arch": "x"})
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert all(torch.equal(loaded.masks[k], masks[k]) for k in masks)
    assert all(pattern.layout_problems(loaded.state[k]) == [] for k in masks)


@pytest.mark.parametrize("pattern_name", PATTERN_NAMES)
@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_scores_every_group_or_refuses_the_pattern(name, pattern_name):
    pattern = PATTERNS.get(pattern_name).example()
    weight = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    criterion = CRITERIA.get(name)
    inputs = ScoreInputs(layer="w", seed=1, round=1,
                         taylor=weight.abs() if criterion.needs_gradients else None)
    if criterion.needs_groups and not pattern.supports_variance:
        with pytest.raises(SparsifyError, match="needs groups of several weights"):
            score_groups(name, weight, pattern, inputs)
        return
    scores = score_groups(name, weight, pattern, inputs)
    assert tuple(scores.shape) == tuple(pattern.mask_shape(tuple(weight.shape))) and scores.dtype == torch.float64
    assert torch.equal(scores, score_groups(name, weight, pattern, inputs))  # the same inputs, the same scores


def method_sections(method: str, pattern: str) -> list[str]:
    spec = PATTERNS.get(pattern).example().spec()
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}"
    return [f"sparsity.method={method}", f"sparsity.pattern={flow}", "sparsity.criterion=l1"]


@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_and_pattern_trains_or_is_refused_at_config_time(method, pattern, tiny_config, cli, tmp_path):
    overrides = method_sections(method, pattern)
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and (method in message or pattern in message), message
        return
    config = tiny_config(data={"limit_train_batches": 1, "limit_val_batches": 1, "fake_samples": 8})
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert cli("download", "-c", config, *sets)[0] == 0
    if METHODS.get(method).prune_rounds:
        code, _, err = cli("prune", "-c", config, *sets)
        assert code == 0, err
    code, _, err = cli("train", "-c", config, *sets)
    assert code == 0, err
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    code, out, err = cli("check", latest)
    assert code == 0, out + err


@pytest.mark.parametrize("name", EXPORTER_NAMES)
def test_every_exporter_writes_a_file_of_the_checkpoint(name, tiny_config, cli, tmp_path):
    if name == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    config = tiny_config()
    assert cli("download", "-c", config)[0] == 0 and cli("prune", "-c", config)[0] == 0
    code, out, err = cli("export", "-c", config, "--format", name, "-o", tmp_path / f"model.{name}")
    assert code == 0, err
    path = tmp_path / f"model.{name}"
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.name.endswith(EXPORTERS.get(name).suffix)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_dataset_builds_splits_its_info_describes(name):
    from sparsify.config import DataConfig
    from sparsify.data.datasets import build_loaders, check_data, dataset_info
    from sparsify.errors import DataError

    cfg = DataConfig(dataset=name, fake_samples=8, batch_size=4)
    try:
        check_data(cfg, num_classes=None)  # files present (fashion-mnist, cifar) or a root given (imagefolder)
    except DataError as exc:
        pytest.skip(f"{name} is not on this machine: {exc}")
    info = dataset_info(cfg)
    assert info.num_classes >= 2 and info.in_channels in (1, 3) and info.input_size >= 8
    train, val = build_loaders(cfg, input_size=info.input_size, num_classes=info.num_classes,
                               in_channels=info.in_channels, seed=0)
    images, labels = next(iter(train))
    assert tuple(images.shape[1:]) == (info.in_channels, info.input_size, info.input_size)
    assert int(labels.max()) < info.num_classes and len(val) > 0


EXECUTOR_LAYERS = {  # tiny layers: short tail blocks (CIN or COUT not a multiple of 8), stride, padding, bias
    "conv3x3-tail-bias": lambda: nn.Conv2d(12, 20, 3, padding=1),
    "conv3x3-stride2": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1, bias=False),
    "conv1x1-stride2-tail": lambda: nn.Conv2d(16, 13, 1, stride=2),
    "conv5x5-dilated": lambda: nn.Conv2d(8, 16, 5, padding=4, dilation=2),
    "conv-valid": lambda: nn.Conv2d(16, 16, (3, 1), stride=(2, 1)),
    "linear-tail": lambda: nn.Linear(40, 20),
    "depthwise": lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16),
}


def executor_masks(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """An 8x8 block mask, a regrouped one (rows in groups sharing columns, one odd row) and an unstructured one."""
    from sparsify.core.block import BlockPattern

    g = torch.Generator().manual_seed(3)
    shape = tuple(weight.shape)
    pattern = BlockPattern(8, 8)
    blocks = pattern.expand(torch.rand(pattern.mask_shape(shape), generator=g) < 0.5, shape)
    cout, columns = shape[0], weight[0].numel()
    regrouped = torch.zeros(cout, columns, dtype=torch.bool)
    for rows in torch.randperm(cout, generator=g).chunk(3):
        regrouped[rows[:, None], torch.randperm(columns, generator=g)[: max(1, columns // 4)][None]] = True
    regrouped[0] = torch.rand(columns, generator=g) < 0.3
    return {"block": blocks, "regrouped": regrouped.reshape(shape),
            "unstructured": torch.rand(shape, generator=g) < 0.2}


@pytest.mark.parametrize("layer_name", list(EXECUTOR_LAYERS))
@pytest.mark.parametrize("name", EXECUTOR_NAMES)
def test_every_executor_matches_dense_in_test_mode_or_says_why_not(name, layer_name):
    from sparsify.runtime.layer import TOLERANCES, SparseLayer

    ran = []
    for kind, mask in executor_masks(EXECUTOR_LAYERS[layer_name]().weight).items():
        torch.manual_seed(0)
        module = EXECUTOR_LAYERS[layer_name]()
        layer = SparseLayer(module, mask, name=layer_name)
        reason = EXECUTORS.get(name)().applies(module, mask, torch.device("cpu"), torch.float32)
        if reason:
            assert isinstance(reason, str) and reason and "\n" not in reason
            with pytest.raises(SparsifyError, match="cannot run layer"):
                layer.use(name)
            continue
        layer.use(name)
        layer.mode = "test"  # raises when the executor's output differs from dense's
        for batch in (1, 3):
            x = torch.randn(batch, 40) if isinstance(module, nn.Linear) else torch.randn(batch, module.in_channels, 9, 11)
            out = layer(x)
            rtol, share = TOLERANCES[torch.float32]
            with torch.no_grad():
                ref = module(x)
            assert torch.allclose(out, ref, rtol=rtol, atol=share * max(1.0, float(ref.abs().max())))
        ran.append(kind)
    if not ran:
        pytest.skip(f"{name} applies to none of the masks of {layer_name}: {reason}")
