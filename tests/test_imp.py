"""Iterative magnitude pruning with scope global: one ranking over all layers, exact counts."""

import math

import pytest
import torch

from sparsify.errors import SparsifyError
from sparsify.core.block import BlockPattern
from sparsify.core.elements import UnstructuredPattern
from sparsify.core.prune import PruneSettings, prune_round


def imp_settings(**kw):
    base = dict(pattern=UnstructuredPattern(), criterion="l1", target=0.8, step=0.2, step_basis="remaining",
                keep_rows=False, keep_cols=False, balanced=False, scope="global")
    base.update(kw)
    return PruneSettings(**base)


def full(weights):
    return {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()}


def test_global_ranking_takes_the_smallest_raw_magnitudes_across_layers():
    weights = {"a": torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, 6.0, -0.1], [7.0, 8.0, 9.0]])}
    # 9 weights, step 0.4 -> ceil(3.6) = 4 zeros: |w| 0.1, 0.5, 1, 2 (two in each layer)
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.4))
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True, False], [True, True, True]]
    assert [(e.name, e.zeros_before, e.zeros_after) for e in log] == [("a", 0, 2), ("b", 0, 2)]


def test_a_layer_held_by_keep_rows_takes_its_next_best_group():
    weights = {"a": torch.tensor([[0.1, 0.2], [5.0, 6.0]]), "b": torch.tensor([[1.0, 2.0, 3.0]])}
    # ceil(0.4 * 7) = 3: globally 0.1, 0.2 (a, one row) and 1.0 (b); keep_rows keeps 0.2, a takes 5.0 instead
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.4, keep_rows=True))
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [[False, True, True]]
    assert all(e.note == "" for e in log)


def test_a_shortfall_no_layer_can_cover_itself_goes_to_the_other_layers():
    weights = {"a": torch.tensor([[0.1, 0.2]]), "b": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    # ceil(0.3 * 8) = 3: a may lose only one of its single row, so b loses 1.0 and then 2.0
    masks, log = prune_round(weights, full(weights), imp_settings(step=0.3, keep_rows=True))
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [[False, False, True], [True, True, True]]
    assert log[0].note.startswith("constraints allowed 1 of 2") and log[1].zeros_after == 2


@pytest.mark.parametrize("keep", [False, True])
def test_every_global_round_zeros_ceil_step_times_kept_until_floor_target_times_total(keep):
    torch.manual_seed(0)
    weights = {"conv2": torch.randn(16, 6, 5, 5), "conv3": torch.randn(40, 16, 3, 3), "fc": torch.randn(10, 40)}
    masks = full(weights)
    total = sum(w.numel() for w in weights.values())
    target = math.floor(0.8 * total)
    zeros, history = 0, []
    for round_ in range(1, 12):
        masked = {n: w * masks[n] for n, w in weights.items()}
        new, log = prune_round(masked, masks, imp_settings(keep_rows=keep, keep_cols=keep), round_=round_)
        assert all(not (new[n] & ~masks[n]).any() for n in masks), "a pruned weight came back"
        after = sum(int((~m).sum()) for m in new.values())
        assert after - zeros == min(math.ceil(0.2 * (total - zeros)), target - zeros)
        assert after == sum(e.zeros_after for e in log) and after <= target
        zeros, masks = after, new
        history.append(zeros)
    assert history[-1] == target and history.count(target) == 4  # 0.8**7 = 0.21 kept: round 8 lands on 80%


def test_global_scope_refuses_block_patterns_and_balanced():
    weights = {"a": torch.randn(8, 8, 1, 1)}
    with pytest.raises(SparsifyError, match="needs pattern 'unstructured', not 'block'"):
        prune_round(weights, {"a": torch.ones(2, 2, dtype=torch.bool)}, imp_settings(pattern=BlockPattern(4, 4)))
    with pytest.raises(SparsifyError, match="balanced"):
        prune_round(weights, full(weights), imp_settings(balanced=True))


# ---------------------------------------------------------------- through the stages


from sparsify.io.checkpoint import load_checkpoint
from sparsify.config import load_config  # noqa: E402
from sparsify import stages  # noqa: E402
from sparsify.errors import TargetReached  # noqa: E402

IMP = [
    "name=imp", "seed=0", "device=cpu", "model.arch=tiny_resnet", "model.num_classes=4", "model.input_size=8",
    "data.dataset=fake", "data.fake_samples=16", "data.batch_size=8", "train.lr=0.05",
    "sparsity.pattern={type: unstructured}", "sparsity.criterion=l1", "sparsity.scope=global",
    "sparsity.target=0.6", "sparsity.step=0.2", "sparsity.exclude=[conv1.weight]",
]


def imp_config(tmp_path, *extra):
    return load_config(None, [f"runs_dir={tmp_path / 'runs'}", *IMP, *extra])


def ckpt(config, index):
    return load_checkpoint(sorted((config.run_dir / "checkpoints").iterdir())[index])


def assert_rewound(pruned, point):
    """Kept weights and every other state entry equal the rewind point; pruned weights are 0. BatchNorm
    statistics re-estimated after the rewind (meta bn_recalibration) are the exception."""
    recalibrated = "bn_recalibration" in pruned.meta
    for key, value in pruned.state.items():
        if recalibrated and key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        expected = point.state[key] * pruned.masks[key] if key in pruned.masks else point.state[key]
        assert torch.equal(value, expected), key


def test_prune_rewinds_kept_weights_and_batchnorm_to_the_rewind_point(tmp_path):
    config = imp_config(tmp_path, "sparsity.rewind={to: round0}", "sparsity.recalibrate_bn=0")
    stages.download(config)
    stages.train(config, epochs=1)
    assert not torch.equal(ckpt(config, 0).state["bn1.running_mean"], ckpt(config, 1).state["bn1.running_mean"])
    stages.prune(config)
    assert_rewound(ckpt(config, 2), ckpt(config, 1))  # round0: the last checkpoint of round 0
    assert load_checkpoint(config.run_dir / "rewind.safetensors").meta["rewind"] == "round0"
    stages.prune(imp_config(tmp_path, "sparsity.rewind={to: init}", "sparsity.recalibrate_bn=0"))  # a changed point is taken again
    assert_rewound(ckpt(config, 3), ckpt(config, 0))  # init: the weights at download
    saved = load_checkpoint(config.run_dir / "rewind.safetensors")
    assert saved.meta["rewind"] == "init" and not saved.masks
    assert int((~ckpt(config, 3).masks["layer1.0.conv1.weight"]).sum()) > 0


def test_rewind_epoch_saves_the_weights_after_that_epoch_of_round_0(tmp_path):
    config = imp_config(tmp_path, "sparsity.rewind={epoch: 1}")
    stages.download(config)
    with pytest.raises(SparsifyError, match="was not saved"):
        stages.prune(config)
    stages.train(config, epochs=2)
    one_epoch = imp_config(tmp_path, "name=imp1")
    stages.download(one_epoch)
    stages.train(one_epoch, epochs=1)  # the same first epoch, stopped there
    saved = load_checkpoint(config.run_dir / "rewind.safetensors")
    assert saved.meta["rewind"] == "epoch 1"
    reference = ckpt(one_epoch, 1).state
    assert all(torch.allclose(saved.state[k].double(), reference[k].double(), atol=1e-6) for k in reference)
    assert not torch.equal(saved.state["conv1.weight"], ckpt(config, 1).state["conv1.weight"])
    stages.prune(config)
    assert "bn_recalibration" in ckpt(config, 2).meta  # on by default: statistics of the rewound, pruned model
    assert_rewound(ckpt(config, 2), saved)


def test_global_imp_with_regroup_records_blocks_and_stops_after_the_target(tmp_path):
    config = imp_config(tmp_path, "sparsity.regroup={enabled: true, clusters: 2, min_rows: 2}",
                        "sparsity.keep_rows=false", "sparsity.keep_cols=false")
    stages.download(config)
    rounds = 0
    with pytest.raises(TargetReached):
        for rounds in range(1, 20):
            result = stages.prune(config)
            assert "regroup:" in result.message
    pruned = ckpt(config, -1)
    info = pruned.meta["regroup"]
    # regroup of random weights removes more than it adds, so the target comes early: round 3 stops
    assert rounds == 3 and info["imp_at_target"] is False and pruned.meta["round"] == 2
    for layer in info["layers"]:
        mask = pruned.masks[layer["parameter"]]
        assert layer["density_after"] == pytest.approx(float(mask.float().mean()), abs=1e-6)
        assert sum(r * c for r, c in layer["block_sizes"]) == int(mask.sum())  # blocks share no row
    from sparsify.report.build import build_report
    from sparsify.report.render import render

    report = build_report(config.run_dir)
    assert [r["parameter"] for r in report["regroup"]] == [layer["parameter"] for layer in info["layers"]]
    table = " ".join(render(report, "table").split())  # the table wraps its notes to the terminal's width
    assert "regroup (this round)" in table and "adds weights inside blocks" in table


def test_taylor_prune_scores_with_gradients_of_training_batches(tmp_path):
    config = imp_config(tmp_path, "sparsity.criterion=taylor", "sparsity.criterion_batches=2")
    stages.download(config)
    result = stages.prune(config)
    total = sum(m.numel() for m in ckpt(config, 1).masks.values())
    assert sum(int((~m).sum()) for m in ckpt(config, 1).masks.values()) == math.ceil(0.2 * total)
    assert result.round == 1
