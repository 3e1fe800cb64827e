"""Pattern channel: groups from the channel graph, tied producers pruned together, criterion bn_scale,
and the CLI loop on tiny_resnet."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsify.core.channel import ChannelPattern
from sparsify.core.criteria import ScoreInputs, score_groups
from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.core.prune import PruneSettings, prune_round
from sparsify.rounds.channelgroups import UNFOLLOWED, batchnorm_scales, channel_groups, tie_masks

PRUNED = ["stem.weight", "conv1.weight", "conv2.weight", "head.weight"]


class Residual(nn.Module):
    """stem-bn-relu, then conv-bn-relu-conv-bn added back to the stem's output, then a 1x1 head."""

    def __init__(self, reshape: bool = False) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.reshape = reshape

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        if self.reshape:  # moves values across the channel axis
            y = y.reshape(1, 4, 2, 6, 6).transpose(1, 2).reshape(1, 8, 6, 6)
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return nn.functional.adaptive_avg_pool2d(self.head(x), 1).flatten(1)


def example() -> torch.Tensor:
    return torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def rows_with_l1(weight: nn.Parameter, values: list[float]) -> None:
    """Every weight of output channel i set to values[i] (so its mean |w| is values[i])."""
    with torch.no_grad():
        weight.copy_(torch.tensor(values).reshape(-1, 1, 1, 1).expand_as(weight))


def test_groups_tie_the_residual_producers_and_skip_the_model_output():
    groups = channel_groups(Residual(), example(), PRUNED)
    assert groups.tied == [["stem.weight", "conv2.weight"]]
    assert set(groups.skipped) == {"head.weight"} and "model output" in groups.skipped["head.weight"]
    assert groups.batchnorm == {"stem.weight": "bn0", "conv1.weight": "bn1", "conv2.weight": "bn2"}


def test_a_reshape_across_channels_is_not_pruned_and_says_why():
    groups = channel_groups(Residual(reshape=True), example(), PRUNED)
    assert "conv1.weight" in groups.skipped and "reshape" in groups.skipped["conv1.weight"]
    assert groups.tied == [["stem.weight", "conv2.weight"]]


def test_a_producer_tied_to_one_that_is_not_pruned_is_not_pruned():
    groups = channel_groups(Residual(), example(), ["conv1.weight", "conv2.weight"])
    assert groups.skipped["conv2.weight"] == "tied through a residual add to stem.weight, which is not pruned"
    assert "conv1.weight" not in groups.skipped and groups.tied == []


def test_an_untraceable_model_prunes_nothing():
    class Branchy(Residual):
        def forward(self, x):
            return self.head(self.stem(x)) if x.sum() > 0 else self.head(self.stem(-x))

    groups = channel_groups(Branchy(), example(), PRUNED)
    assert set(groups.skipped) == set(PRUNED) and "cannot be traced" in groups.skipped["stem.weight"]
    assert UNFOLLOWED not in groups.skipped.values()


def test_tied_producers_are_pruned_together_by_their_summed_scores():
    model = Residual()
    rows_with_l1(model.stem.weight, [1, 2, 5, 5, 5, 5, 5, 5])  # alone: channels 0, 1
    rows_with_l1(model.conv2.weight, [5, 5, 5, 5, 5, 5, 1, 2])  # alone: channels 6, 7; summed: 0 and 6
    pattern, names = ChannelPattern(), ["stem.weight", "conv2.weight"]
    weights = dict(model.named_parameters())
    before = full_masks(model, names, pattern)
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.25)
    alone, entries = prune_round(weights, before, settings)
    assert alone["stem.weight"].reshape(-1).tolist() == [False] * 2 + [True] * 6
    assert alone["conv2.weight"].reshape(-1).tolist() == [True] * 6 + [False] * 2
    inputs = {n: ScoreInputs(n) for n in names}
    masks, entries = tie_masks(before, alone, entries, weights, [names], criterion="l1", pattern=pattern,
                               inputs=inputs)
    expected = [False, True, True, True, True, True, False, True]
    assert masks["stem.weight"].reshape(-1).tolist() == expected == masks["conv2.weight"].reshape(-1).tolist()
    assert [e.zeros_after for e in entries] == [2, 2]
    again, entries = prune_round(weights, masks, settings)  # the next round keeps what is pruned
    masks2, entries = tie_masks(masks, again, entries, weights, [names], criterion="l1", pattern=pattern, inputs=inputs)
    kept = masks2["stem.weight"].reshape(-1)
    assert int((~kept).sum()) == 4 and not (kept & ~masks["stem.weight"].reshape(-1)).any()
    assert torch.equal(masks2["stem.weight"], masks2["conv2.weight"])


def test_a_pruned_channel_is_exactly_zero_after_its_batchnorm_in_eval_and_in_training():
    """The mask's meaning: the producer's row and its BatchNorm's scale and shift are zero, so the channel
    carries zeros whatever the running statistics; a training step cannot grow the shift back."""
    model = Residual().eval()
    with torch.no_grad():
        model.bn0.running_mean.fill_(0.5), model.bn0.running_var.fill_(4.0), model.bn0.bias.fill_(1.0)
    mask = torch.ones(8, 1, dtype=torch.bool)
    mask[3] = False
    enforcer = MaskEnforcer(model, {"stem.weight": mask}, ChannelPattern())
    enforcer.apply_()
    assert model.bn0.weight[3] == 0 and model.bn0.bias[3] == 0 and model.bn0.bias[2] == 1.0
    out = model.bn0(model.stem(example()))
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3])) and out[:, 2].std() > 0
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(example()).square().mean().backward()
    enforcer.mask_grads_()
    assert model.bn0.bias.grad[3] == 0 and model.bn0.bias.grad.abs().sum() > 0
    optimizer.step()
    enforcer.apply_()
    assert model.bn0.bias[3] == 0 and model.bn0.weight[3] == 0
    head = torch.ones(4, 1, dtype=torch.bool)
    head[1] = False
    MaskEnforcer(model, {"head.weight": head}, ChannelPattern()).apply_()  # a layer's own bias goes with it
    assert model.head.bias[1] == 0 and bool((model.head.bias[[0, 2, 3]] != 0).all())


def test_bn_scale_ranks_channels_by_the_absolute_gamma_after_the_layer():
    model = Residual()
    gamma = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.05, 4.0])
    with torch.no_grad():
        model.bn1.weight.copy_(gamma)
    groups = channel_groups(model, example(), PRUNED)
    scales = batchnorm_scales(model, groups, ["conv1.weight", "head.weight"])
    assert set(scales) == {"conv1.weight"} and torch.equal(scales["conv1.weight"], gamma.abs().double())
    scores = score_groups("bn_scale", model.conv1.weight, ChannelPattern(),
                          ScoreInputs("conv1.weight", channel_scale=scales["conv1.weight"]))
    assert torch.argsort(scores.reshape(-1)).tolist() == [6, 2, 4, 0, 5, 3, 1, 7]
    settings = PruneSettings(pattern=ChannelPattern(), criterion="bn_scale", target=0.5, step=0.5)
    masks, _ = prune_round({"conv1.weight": model.conv1.weight}, full_masks(model, ["conv1.weight"], ChannelPattern()),
                           settings, channel_scales=scales)
    assert masks["conv1.weight"].reshape(-1).tolist() == [False, True] * 4  # the 4 lowest |gamma|: 6, 2, 4, 0


def test_balanced_is_refused_with_pattern_channel(tiny_config, cli):
    code, _, err = cli("download", "-c", tiny_config(sparsity={"pattern": {"type": "channel"}, "balanced": True}))
    assert code == 1 and "sparsity.balanced" in err and len(err.strip().splitlines()) == 1


def test_keep_cols_keeps_one_channel_and_keep_rows_does_not_apply():
    weight = nn.Parameter(torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(0)))
    masks = {"w": torch.ones(4, 1, dtype=torch.bool)}
    for keep_cols, kept in ((True, 1), (False, 0)):
        settings = PruneSettings(pattern=ChannelPattern(), criterion="l1", target=1.0, step=1.0, keep_rows=True,
                                 keep_cols=keep_cols)
        new, _ = prune_round({"w": weight}, masks, settings)
        assert int(new["w"].sum()) == kept


@pytest.mark.parametrize("criterion", ["l2", "bn_scale"])
def test_the_shell_loop_prunes_channels_until_exit_3(criterion, tiny_config, cli, tmp_path):
    config = tiny_config(sparsity={"pattern": {"type": "channel"}, "criterion": criterion, "target": 0.5, "step": 0.3,
                                   "exclude": ["layer1.0.conv2.weight"]},
                         data={"limit_train_batches": 1, "limit_val_batches": 1})
    assert cli("download", "-c", config)[0] == 0
    codes = [cli("prune", "-c", config)[0] for _ in range(3)]
    assert codes == [0, 0, 3], codes
    code, _, err = cli("train", "-c", config)
    assert code == 0, err
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    code, out, err = cli("check", latest, "--format", "json")
    assert code == 0 and json.loads(out)["follows"], out + err
    code, out, err = cli("report", "-c", config, "--format", "json")
    assert code == 0, err
    rows = {row["parameter"]: row for row in json.loads(out)["layers"]}
    assert rows["conv1.weight"]["eligible"] == ("no: tied through a residual add to layer1.0.conv2.weight, "
                                               "which is not pruned")
    assert rows["layer1.0.conv1.weight"]["groups"] == 16 and rows["layer1.0.conv1.weight"]["groups_kept"] == 8
    assert rows["layer1.0.conv1.weight"]["sparsity"] == 0.5
    tied = [name for name in rows if name.startswith("layer2") and name.endswith(("conv2.weight", "0.weight"))]
    kept = {name: rows[name]["groups_kept"] for name in tied}
    assert len(set(kept.values())) == 1 and kept, kept


def test_tied_producers_with_their_own_targets_prune_to_the_lowest():
    model = Residual()
    pattern, names = ChannelPattern(), ["stem.weight", "conv2.weight"]
    weights = dict(model.named_parameters())
    before = full_masks(model, names, pattern)
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=1.0,
                             layer_targets={"stem.weight": 0.25, "conv2.weight": 0.75})
    alone, entries = prune_round(weights, before, settings)
    assert [e.zeros_after for e in entries] == [2, 6]
    masks, entries = tie_masks(before, alone, entries, weights, [names], criterion="l1", pattern=pattern,
                               inputs={n: ScoreInputs(n) for n in names})
    assert [e.zeros_after for e in entries] == [2, 2] and torch.equal(masks["stem.weight"], masks["conv2.weight"])


def test_taylor_scores_channels_through_the_prune_round(tiny_config, cli, tmp_path):
    config = tiny_config(sparsity={"pattern": {"type": "channel"}, "method": "static", "criterion": "taylor",
                                   "criterion_batches": 1},
                         data={"limit_train_batches": 1, "limit_val_batches": 1})
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("prune", "-c", config)
    assert code == 0 and "tied through residual adds pruned together" in out + err, out + err
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    code, out, err = cli("check", latest)
    assert code == 0, out + err
