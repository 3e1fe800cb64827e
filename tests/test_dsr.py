"""Dynamic sparse reparameterization: exact counts, the threshold rule, proportional regrowth, ranks."""

import socket
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sparsify.io.checkpoint import load_checkpoint
from sparsify.io.rundir import RunDir
from dsr_ranks import rank_worker
from sparsify.cli import app
from sparsify.methods.dsr import (
    DsrCallback, DsrSettings, adjust_threshold, allocate, apportion, cap_pruned,
    kept_counts, period_at, prune_below, reparameterize, step_generator, thin_masks,
)
from sparsify.core.masks import MaskEnforcer
from sparsify.core.elements import UnstructuredPattern


def hand_case():
    """Two 2x4 tensors: `a` keeps 6 (one below H=0.1), `b` keeps 4 (two below H)."""
    weights = {
        "a": torch.tensor([[0.05, 0.5, 0.6, 0.0], [0.7, 0.8, 0.9, 0.0]]),
        "b": torch.tensor([[0.01, -0.02, 0.0, 0.0], [0.3, -0.4, 0.0, 0.0]]),
    }
    masks = {
        "a": torch.tensor([[True, True, True, False], [True, True, True, False]]),
        "b": torch.tensor([[True, True, False, False], [True, True, False, False]]),
    }
    return weights, masks


def test_apportion_and_allocate_are_exact_and_proportional():
    assert apportion(8, [30, 10]) == [6, 2]
    assert apportion(3, [5, 2]) == [2, 1]  # 15/7 = 2.14 and 6/7 = 0.86: the larger remainder gets the spare one
    assert apportion(1, [1, 1]) == [1, 0]  # ties go to the first
    assert allocate(8, [30, 10], [3, 100]) == [3, 5]  # `a` is full: its excess moves on
    assert allocate(4, [0, 0], [1, 3]) == [1, 3]  # no survivors anywhere: shared by room


def test_reparameterize_hand_case():
    weights, masks = hand_case()
    new, report = reparameterize(weights, masks, threshold=0.1, target=3, tolerance=0.1,
                                 generator=step_generator(0, 1))
    assert report.pruned == {"a": 1, "b": 2}
    assert report.grown == {"a": 2, "b": 1}  # 3 freed, shared 5:2 by the survivors
    assert report.threshold_next == 0.1  # 3 pruned == N_p: H stays
    assert torch.equal(new["a"], torch.tensor([[False, True, True, True], [True, True, True, True]]))
    assert not new["b"][0, 0] and not new["b"][0, 1]  # just pruned: never regrown
    assert new["b"][1, 0] and new["b"][1, 1] and int(new["b"].sum()) == 3
    assert sum(int(m.sum()) for m in new.values()) == 10


def test_threshold_doubles_or_halves_by_the_count_rule():
    assert adjust_threshold(0.1, pruned=3, target=10, tolerance=0.1) == 0.2  # 3 < 9: too few
    assert adjust_threshold(0.1, pruned=3, target=2, tolerance=0.1) == 0.05  # 3 > 2.2: too many
    assert adjust_threshold(0.1, pruned=11, target=10, tolerance=0.1) == 0.1  # within 10%
    assert adjust_threshold(0.1, pruned=9, target=10, tolerance=0.1) == 0.1
    weights, masks = hand_case()
    _, report = reparameterize(weights, masks, threshold=0.1, target=10, tolerance=0.1, generator=step_generator(0, 1))
    assert report.threshold_next == 0.2


def test_a_tensor_keeps_its_largest_weight():
    weights = {"w": torch.tensor([0.01, -0.03, 0.02, 0.0])}
    masks = {"w": torch.tensor([True, True, True, False])}
    pruned = prune_below(weights, masks, 1.0)
    assert pruned["w"].tolist() == [True, False, True, False]


def test_pruning_is_capped_by_the_free_positions():
    weights = {"w": torch.tensor([0.01, 0.02, 0.03, 0.5, 0.0])}
    pruned = {"w": torch.tensor([True, True, True, False, False])}
    assert cap_pruned(weights, pruned, 1)["w"].tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_stay_exact_and_no_regrowth_into_just_pruned(seed):
    gen = torch.Generator().manual_seed(seed)
    weights = {"a": torch.randn(16, 8, 3, 3, generator=gen) * 0.05, "b": torch.randn(32, 16, generator=gen) * 0.05}
    masks = thin_masks(weights, {"a": 115, "b": 51}, seed=seed)
    assert [int(m.sum()) for m in masks.values()] == [115, 51]
    threshold = 1e-3
    for step in range(1, 21):
        for name in weights:  # training moves the kept weights; pruned/never-kept stay 0.0
            weights[name] = (weights[name] + 0.02 * torch.randn(weights[name].shape, generator=gen)) * masks[name]
        below = prune_below(weights, masks, threshold)
        new, report = reparameterize(weights, masks, threshold=threshold, target=20, tolerance=0.1,
                                     generator=step_generator(seed, step))
        for name in weights:
            assert not bool((new[name] & below[name]).any())  # no regrowth where a weight was just pruned
            assert int((masks[name] & ~new[name]).sum()) == report.pruned[name] == int(below[name].sum())
            assert int((new[name] & ~masks[name]).sum()) == report.grown[name]
        assert sum(int(m.sum()) for m in new.values()) == 166
        masks, threshold = new, report.threshold_next


def test_schedule_and_counts():
    settings = DsrSettings(period=100, double_at=(25, 80, 140), stop_epoch=190)
    assert [period_at(e, settings) for e in (0, 24, 25, 79, 80, 140, 189, 190)] == [
        100, 100, 200, 200, 400, 800, 800, None]
    # the dst tables' WRN-28-2: 1,451,520 sparse of 1,467,610 parameters at 0.9 over all parameters
    sizes = {"x": 1_000_000, "y": 451_520}
    keep = kept_counts(sizes, target=0.9, budget="all", total_params=1_467_610)
    assert sum(keep.values()) == 1_451_520 - 1_320_849
    assert kept_counts({"x": 10, "y": 7}, target=0.5, budget="eligible", total_params=99) == {"x": 5, "y": 4}


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 20, bias=False)
        self.fc2 = nn.Linear(20, 5, bias=False)


def test_callback_thins_then_reparameterizes_every_period():
    torch.manual_seed(0)
    model = TwoLayers()
    enforcer = MaskEnforcer(model, {}, UnstructuredPattern())
    settings = DsrSettings(target=0.75, prune_fraction=0.2, period=2, double_at=(1,), stop_epoch=2, threshold=0.05)
    callback = DsrCallback(settings, ["fc1.weight", "fc2.weight"], seed=3, threshold=settings.threshold)
    callback.on_train_start(model, enforcer)
    assert [int(enforcer.masks[n].sum()) for n in callback.names] == [50, 25]  # 200 - 150, 100 - 75
    assert callback.target == 15
    for step in range(1, 9):
        callback.after_step(step, (step - 1) // 4, model, enforcer)  # 4 steps per epoch
        assert sum(int(enforcer.masks[n].sum()) for n in callback.names) == 75
        for name, param in model.named_parameters():
            assert not bool(param[~enforcer.masks[name]].any())
    assert len(callback.steps) == 3  # epoch 0: steps 2 and 4; epoch 1 (period 4): step 8
    assert callback.stage_meta()["dsr"]["epochs"] == 2


def test_two_gloo_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ranks.pt")
    mp.spawn(rank_worker, args=(port, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert torch.equal(result["masks"][0], result["masks"][1])
    assert result["thresholds"][0].item() == result["thresholds"][1].item()


DSR_RUN = textwrap.dedent(
    """\
    name: d
    seed: 0
    device: cpu
    model: {arch: tiny_resnet, num_classes: 4}
    data: {dataset: fake, fake_samples: 16, batch_size: 8}
    sparsity:
      pattern: {type: unstructured}
      method: dsr
      target: 0.75
      exclude: ["conv1.weight"]
      dsr: {period: 1, prune_fraction: 0.1, double_at: [1], stop_epoch: 5}
    train: {lr: 0.05, epochs: 2}
    """
)


def test_dsr_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.yaml").write_text(DSR_RUN)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-c", "d.yaml"])
    assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "runs/d")
    ckpt = load_checkpoint(run.latest())
    assert ckpt.meta["stage"] == "final"
    state = ckpt.meta["method_state"]["dsr"]
    assert state["iteration"] == 4 and state["reparameterizations"] == 3 and state["epochs"] == 2
    kept = sum(int(m.sum()) for m in ckpt.masks.values())
    assert kept == sum(m.numel() - int(0.75 * m.numel()) for m in ckpt.masks.values())
    result = runner.invoke(app, ["prune", "-c", "d.yaml"])
    assert result.exit_code == 1 and "no prune rounds" in result.output + result.stderr
    report = runner.invoke(app, ["report", "-c", "d.yaml", "--format", "json"])
    assert "Parameter tensor" in report.stdout and "# free parameters" in report.stdout
