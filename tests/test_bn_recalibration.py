"""BatchNorm re-estimation after a prune (training/bn.py, stages/prune.py): the statistics equal a hand
computation of torch's cumulative average, nothing but BatchNorm buffers changes, and `prune` records it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sparsify.core.patterns import build_pattern
from sparsify.models.builtin import tiny_resnet
from sparsify.training.bn import batchnorm_layers, recalibrate_batchnorm_

CPU = torch.device("cpu")
SCALES = (1.0, -2.0)  # the 1x1 conv's two output channels: x and -2x
BATCHES = [  # (images, target): two images of 1x1x3 pixels per batch, values chosen by hand
    (torch.tensor([[[[1.0, 2.0, 3.0]]], [[[4.0, 5.0, 6.0]]]]), torch.tensor([0, 1])),
    (torch.tensor([[[[0.0, 0.0, 6.0]]], [[[6.0, 0.0, 0.0]]]]), torch.tensor([1, 0])),
    (torch.tensor([[[[9.0, 9.0, 9.0]]], [[[9.0, 9.0, 9.0]]]]), torch.tensor([0, 0])),
]


def conv_bn(*, dropout: float = 0.0) -> nn.Sequential:
    """conv 1x1 (1 -> 2 channels, weights SCALES) -> dropout -> BatchNorm with stale statistics."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(SCALES).view(2, 1, 1, 1))
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(3.0)
    bn.num_batches_tracked.fill_(100)
    return nn.Sequential(conv, nn.Dropout(dropout), bn).eval()


def by_hand(batches: list) -> tuple[list[float], list[float]]:
    """Per channel: the plain average over batches of each batch's mean and unbiased variance."""
    means, variances = [], []
    for scale in SCALES:
        per_batch = [[scale * v for v in images.flatten().tolist()] for images, _ in batches]
        means.append(statistics.mean(statistics.mean(values) for values in per_batch))
        variances.append(statistics.mean(statistics.variance(values) for values in per_batch))
    return means, variances


def test_statistics_are_the_average_of_the_per_batch_statistics():
    model = conv_bn()
    assert recalibrate_batchnorm_(model, iter(BATCHES), limit=3, device=CPU) == 3
    bn = model[2]
    means, variances = by_hand(BATCHES)
    assert bn.running_mean.tolist() == pytest.approx(means, rel=1e-6)
    assert bn.running_var.tolist() == pytest.approx(variances, rel=1e-6)
    assert int(bn.num_batches_tracked) == 3
    pooled = statistics.variance([v for images, _ in BATCHES for v in images.flatten().tolist()])
    assert abs(variances[0] - pooled) > 1.0  # the pooled variance of all images is a different number


def test_only_the_first_limit_batches_count_and_the_loader_may_be_shorter():
    model = conv_bn()
    assert recalibrate_batchnorm_(model, iter(BATCHES), limit=2, device=CPU) == 2
    assert model[2].running_mean.tolist() == pytest.approx(by_hand(BATCHES[:2])[0], rel=1e-6)
    model = conv_bn()
    assert recalibrate_batchnorm_(model, iter(BATCHES), limit=50, device=CPU) == 3
    assert model[2].running_var.tolist() == pytest.approx(by_hand(BATCHES)[1], rel=1e-6)


def test_dropout_stays_off_and_only_batchnorm_buffers_change():
    model = conv_bn(dropout=0.9)  # dropout in train mode would zero most values and change the statistics
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    recalibrate_batchnorm_(model, iter(BATCHES), limit=3, device=CPU)
    assert model[2].running_mean.tolist() == pytest.approx(by_hand(BATCHES)[0], rel=1e-6)
    assert all(torch.equal(p, parameters[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(module.training for module in model.modules())  # modes restored
    assert model[2].momentum == 0.1  # momentum restored


def test_zero_batches_or_no_batchnorm_change_nothing():
    model = conv_bn()
    assert recalibrate_batchnorm_(model, iter(BATCHES), limit=0, device=CPU) == 0
    assert recalibrate_batchnorm_(model, iter([]), limit=5, device=CPU) == 0  # an empty loader keeps them too
    assert model[2].running_mean.tolist() == [7.0, 7.0] and model[2].running_var.tolist() == [3.0, 3.0]
    assert int(model[2].num_batches_tracked) == 100
    plain = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert batchnorm_layers(plain) == []
    assert recalibrate_batchnorm_(plain, iter(BATCHES), limit=3, device=CPU) == 0
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def checkpoint(run: str, name: str) -> tuple[dict, dict]:
    with safe_open(str(Path("runs", run, "checkpoints", name)), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def is_bn_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_prune_eval_prints_before_and_after_and_the_checkpoint_records_it(tiny_config, cli):
    config = tiny_config()
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("prune", "-c", config, "--eval")
    assert code == 0, out + err
    layers = len(batchnorm_layers(tiny_resnet(num_classes=4, in_channels=3)))  # stem, blocks, shortcuts: 9
    assert f"BatchNorm re-estimated on 2 batches ({layers} layers); val top-1 " in out  # 32 fake images, batch 16
    tensors, raw = checkpoint("tiny", "001-r01-pruned.safetensors")
    record = json.loads(raw["bn_recalibration"])
    assert record["batches"] == 2 and record["layers"] == layers == 9
    assert f"val top-1 {record['val_acc1_before']:.2f}% before, {record['val_acc1_after']:.2f}% after" in out
    assert int(tensors["model.layer1.0.bn1.num_batches_tracked"]) == 2
    code, out, err = cli("report", "-c", config)
    assert code == 0, err
    assert (f"BatchNorm re-estimated on 2 batches ({layers} layers); val top-1 {record['val_acc1_before']:.2f}% "
            f"before, {record['val_acc1_after']:.2f}% after") in " ".join(out.split())  # notes wrap at 80 columns
    code, out, err = cli("eval", "-c", config)  # eval right after the prune: the re-estimated model, and what it did
    assert code == 0, err
    assert out.strip().startswith(f"001-r01-pruned.safetensors: val top-1 {record['val_acc1_after']:.2f}%")
    assert out.strip().endswith(f"; BatchNorm re-estimated at prune on 2 batches (val top-1 "
                                f"{record['val_acc1_before']:.2f}% before it)")


def test_re_estimation_changes_only_batchnorm_buffers_and_masks_stay_exact(tiny_config, cli):
    for name, batches in (("on", 20), ("off", 0)):
        config = tiny_config(name=name, sparsity={"recalibrate_bn": batches})
        assert cli("download", "-c", config)[0] == 0
        assert cli("train", "-c", config, "--epochs", "1")[0] == 0  # statistics that differ from a reset
        code, out, err = cli("prune", "-c", config)
        assert code == 0, out + err
        assert ("BatchNorm re-estimated" in out) == (batches > 0)
    names = sorted(path.name for path in Path("runs", "off", "checkpoints").glob("*.safetensors"))
    parent, _ = checkpoint("off", names[-2])
    on, on_meta = checkpoint("on", names[-1])
    off, off_meta = checkpoint("off", names[-1])
    assert int(parent["model.bn1.num_batches_tracked"]) == 2 and not parent["model.bn1.running_mean"].eq(0).all()
    assert "bn_recalibration" not in off_meta and "bn_recalibration" in on_meta
    assert on.keys() == off.keys()
    for key in on:
        if is_bn_buffer(key):
            assert torch.equal(off[key], parent[key]), key  # 0: the parent's statistics
        else:
            assert torch.equal(on[key], off[key]), key  # weights and masks: re-estimation touches neither
    assert any(not torch.equal(on[k], off[k]) for k in on if k.endswith("running_var"))
    pattern = build_pattern(json.loads(on_meta["pattern"]))
    masks = {key[len("mask."):]: m.bool() for key, m in on.items() if key.startswith("mask.")}
    assert masks and any(not m.all() for m in masks.values())
    for name, mask in masks.items():
        weight = on[f"model.{name}"]
        assert weight[~pattern.expand(mask, tuple(weight.shape))].eq(0).all(), name


def test_a_model_without_batchnorm_is_pruned_as_before(tiny_config, cli):
    config = tiny_config(model={"arch": "lenet5", "num_classes": 4, "input_size": 28},
                         sparsity={"pattern": {"type": "unstructured"}, "criterion": "l1"})
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("prune", "-c", config, "--eval")
    assert code == 0, out + err
    assert "BatchNorm not re-estimated: no BatchNorm" in out
    _, meta = checkpoint("tiny", "001-r01-pruned.safetensors")
    assert "bn_recalibration" not in meta
