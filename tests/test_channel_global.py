"""Pattern channel with scope global: the target is a share of the model's multiply-adds that compaction
removes; one ranking of normalised scores over the model, tied producers as one group."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsify.core.channel import ChannelPattern
from sparsify.core.masks import full_masks
from sparsify.core.prune import PruneSettings
from sparsify.errors import SparsifyError, TargetReached
from sparsify.graph.channelmacs import channel_macs
from sparsify.graph.channels import traced_graph
from sparsify.graph.compact import compact_model
from sparsify.rounds.base import PruneRound
from sparsify.rounds.channelglobal import normalised, prune_channels_global, refuse_without_room
from sparsify.rounds.channelgroups import groups_of_graph
from sparsify.stages.costs import layer_costs

PRODUCERS = ["a.weight", "b.weight", "c1.weight", "c2.weight"]


class Fork(nn.Module):
    """Three branches on a 4x4 picture, summed into the output by three 1x1 heads (2 outputs each):
    a (1x1, 3 channels), b (3x3, 3 channels) and c1 + c2 (1x1, 2 channels tied by their add)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1, bias=False)
        self.b = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.c1, self.c2 = nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False)
        self.ha, self.hb, self.hc = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.ha(torch.relu(self.a(x))) + self.hb(torch.relu(self.b(x))) + self.hc(torch.relu(self.c1(x) + self.c2(x)))
        return nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)


# per image, 16 positions: a 16*3*2 = 96, b 16*9*3*2 = 864, c1 = c2 = 16*2*2 = 64, ha = hb = 16*2*3 = 96, hc = 64
DENSE = 96 + 864 + 64 + 64 + 96 + 96 + 64
COST = {"a": 16 * 2 + 16 * 2, "b": 16 * 9 * 2 + 16 * 2, "c": 16 * 2 + 16 * 2 + 16 * 2}  # producers + head


def fork() -> Fork:
    """Rows with known mean |w|: l1 normalised by the layer's mean is a [0.5, 1.25, 1.25], b [1/3, 4/3, 4/3]
    (though b's raw scores are the largest), c1 [0.5, 1.5] and c2 [1, 1]: the tied set scores [0.75, 1.25]."""
    model = Fork()
    rows = {"a": [2.0, 5.0, 5.0], "b": [10.0, 40.0, 40.0], "c1": [1.0, 3.0], "c2": [1.0, 1.0]}
    with torch.no_grad():
        for name, values in rows.items():
            weight = getattr(model, name).weight
            weight.copy_(torch.tensor(values).reshape(-1, 1, 1, 1).expand_as(weight))
    return model


def example() -> torch.Tensor:
    return torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def global_round(model: nn.Module, masks: dict, *, target: float, step: float, number: int = 1) -> PruneRound:
    """One global round as `sparsify prune` runs it: groups and multiply-adds from the traced graph, then the ranking."""
    traced, graph = traced_graph(model, example())
    groups = groups_of_graph(model, traced, graph, list(masks))
    round_ = PruneRound(model=model, pattern=ChannelPattern(), sparsity=None, parent_meta={},
                        masks={n: m for n, m in masks.items() if n not in groups.skipped}, first_round=number == 1,
                        seed=0, train_batches=lambda: [], device=torch.device("cpu"),
                        channel_macs=channel_macs(traced, graph))
    refuse_without_room(round_.channel_macs, round_.masks, target)
    settings = PruneSettings(pattern=ChannelPattern(), criterion="l1", target=target, step=step, scope="global")
    round_.masks, round_.entries = prune_channels_global(round_, settings, number)
    return round_


def kept(round_: PruneRound) -> dict[str, list[bool]]:
    return {n: m.reshape(-1).tolist() for n, m in round_.masks.items()}


def test_the_multiply_adds_model_counts_what_compaction_leaves():
    model = fork()
    traced, graph = traced_graph(model, example())
    costs = channel_macs(traced, graph)
    assert costs.dense() == DENSE == sum(row["macs"] for row in layer_costs(model, example()))
    assert sorted(n for names in costs.producers.values() for n in names) == sorted(PRODUCERS)
    counts = costs.kept_counts(full_masks(model, PRODUCERS, ChannelPattern()))
    by_layer = {costs.producers[root][0][0]: costs.removal_cost(root, counts) for root in costs.producers}
    assert by_layer == COST
    with torch.no_grad():  # zero a's channel 0 and the tied c channel 1: compaction removes exactly those
        model.a.weight[0] = 0
        model.c1.weight[1] = 0
        model.c2.weight[1] = 0
    masks = {n: p.detach().reshape(p.shape[0], -1).ne(0).any(1, keepdim=True)
             for n, p in model.named_parameters() if n in PRODUCERS}
    compact = compact_model(model, example()).model
    assert costs.total(costs.kept_counts(masks)) == DENSE - COST["a"] - COST["c"]
    assert costs.total(costs.kept_counts(masks)) == sum(row["macs"] for row in layer_costs(compact, example()))


def test_normalised_scores_rank_across_layers_and_stop_at_the_round_goal():
    model = fork()
    round_ = global_round(model, full_masks(model, PRODUCERS, ChannelPattern()), target=0.5, step=0.25)
    # goal 0.25 * 1344 = 336: b's channel 0 (1/3, though its raw l1 is 10) saves 320, then a's channel 0 (0.5) 64
    assert kept(round_) == {"a.weight": [False, True, True], "b.weight": [False, True, True],
                            "c1.weight": [True, True], "c2.weight": [True, True]}
    record = round_.meta["channel_macs"]
    assert record == {"dense": DENSE, "compact": DENSE - 320 - 64, "removed": round((320 + 64) / DENSE, 6),
                      "target": 0.5, "round_removed": 384}
    assert [(e.name, e.zeros_before, e.zeros_after) for e in round_.entries] == [
        ("a.weight", 0, 1), ("b.weight", 0, 1), ("c1.weight", 0, 0), ("c2.weight", 0, 0)]
    assert "1.34k -> 960 after compaction (28.6% removed; target 50%)" in round_.notes[-1]


def test_tied_producers_go_together_and_no_layer_loses_its_last_channel_or_passes_the_target():
    model = fork()
    first = global_round(model, full_masks(model, PRODUCERS, ChannelPattern()), target=0.5, step=0.25)
    with torch.no_grad():
        for name, mask in first.masks.items():
            dict(model.named_parameters())[name].mul_(mask.reshape(-1, 1, 1, 1))
    second = global_round(model, first.masks, target=0.5, step=0.25, number=2)
    # goal min(0.25 * 960, 672 - 384) = 240; scores over the kept channels: the tied c set's channel 0 (0.75)
    # saves 96, a's channel 1 (1.0) 64; a's channel 2 would be its last, b's channels (320) pass the target
    assert kept(second) == {"a.weight": [False, False, True], "b.weight": [False, True, True],
                            "c1.weight": [False, True], "c2.weight": [False, True]}
    assert second.meta["channel_macs"]["compact"] == DENSE - 320 - 64 - 96 - 64
    with torch.no_grad():
        for name, mask in second.masks.items():
            dict(model.named_parameters())[name].mul_(mask.reshape(-1, 1, 1, 1))
    with pytest.raises(TargetReached, match="40.5% of the model's multiply-adds and no channel left fits"):
        global_round(model, second.masks, target=0.5, step=0.25, number=3)


def test_bn_scale_is_compared_as_it_is_and_other_scores_by_their_layer_mean():
    scores, kept_ = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, True, False])
    assert normalised(scores, kept_, raw=False).tolist() == pytest.approx([2 / 3, 4 / 3, 4.0])
    assert normalised(scores, kept_, raw=True).tolist() == [1.0, 2.0, 6.0]
    assert normalised(torch.zeros(2), torch.tensor([True, True]), raw=False).tolist() == [0.0, 0.0]


def test_the_cli_loop_reaches_half_the_multiply_adds_and_export_compact_agrees(tiny_config, cli, tmp_path):
    from sparsify.io.checkpoint import load_checkpoint
    from sparsify.runtime import load_compact

    config = tiny_config(sparsity={"pattern": {"type": "channel"}, "scope": "global", "target": 0.5, "step": 0.5},
                         data={"limit_train_batches": 1, "limit_val_batches": 1})
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("prune", "-c", config)
    assert code == 0 and "after compaction (" in out + err, out + err
    assert cli("train", "-c", config, "--epochs", "1")[0] == 0
    while (result := cli("prune", "-c", config))[0] == 0:
        assert cli("train", "-c", config, "--epochs", "1")[0] == 0
    code, out, err = result
    assert code == 3 and "no channel left fits under the target (50%)" in out + err, out + err
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    record = load_checkpoint(latest).meta["channel_macs"]  # the trained checkpoint keeps its round's record
    assert 0.45 <= record["removed"] <= 0.5 and record["target"] == 0.5
    code, out, err = cli("export", "-c", config, "--compact")
    assert code == 0, err
    x = torch.randn(1, 3, 32, 32)
    compact_macs = sum(row["macs"] for row in layer_costs(load_compact(out.strip().splitlines()[-1]).eval(), x))
    assert abs(compact_macs - record["compact"]) <= 0.03 * record["compact"]
    code, out, err = cli("report", "-c", config, "--format", "json")
    assert code == 0 and json.loads(out)["compaction"]["macs_after"] == compact_macs


def test_scope_global_is_refused_for_block_and_with_per_layer_targets(tiny_config, cli):
    code, out, err = cli("prune", "-c", tiny_config(sparsity={"scope": "global"}))
    assert code == 1 and "applies to pattern unstructured" in err and "not 'block'" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("prune", "-c", tiny_config(sparsity={"pattern": {"type": "channel"}, "scope": "global",
                                                              "layers": {"conv1.weight": 0.2}}))
    assert code == 1 and "per-layer targets" in err and "use scope: layer" in err
    with pytest.raises(SparsifyError, match="share of the model's multiply-adds"):
        from sparsify.core.prune import prune_round
        prune_round({"w": torch.ones(4, 2, 1, 1)}, {"w": torch.ones(4, 1, dtype=torch.bool)},
                    PruneSettings(pattern=ChannelPattern(), criterion="l1", scope="global"))


def test_the_round_goal_follows_step_basis_and_never_passes_the_target():
    from sparsify.rounds.channelglobal import macs_budget, macs_goal

    assert macs_budget(1000, 800, 0.5) == 300 and macs_budget(1000, 400, 0.5) == -100
    assert macs_goal(1000, 800, target=0.5, step=0.25, step_basis="remaining") == 200  # 0.25 of the 800 left
    assert macs_goal(1000, 800, target=0.5, step=0.25, step_basis="target") == 125  # 0.25 of the 500 to remove
    assert macs_goal(1000, 600, target=0.5, step=0.5, step_basis="remaining") == 100  # capped at the target


def test_a_model_without_a_followed_channel_or_torch_fx_is_refused_with_one_line(tmp_path):
    from sparsify.config import load_config
    from sparsify.rounds.hooks import ChannelCoupling

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y if y.sum() > 0 else -y)

    sparsity = load_config(None, ["sparsity.pattern={type: channel}", "sparsity.scope=global"]).sparsity

    def round_for(model, name="a.weight"):
        return PruneRound(model=model, pattern=ChannelPattern(), sparsity=sparsity, parent_meta={"in_channels": 2,
                          "input_size": 4}, masks=full_masks(model, [name], ChannelPattern()), first_round=True,
                          seed=0, train_batches=lambda: [], device=torch.device("cpu"))

    with pytest.raises(SparsifyError, match="torch.fx cannot trace this model") as caught:
        ChannelCoupling().before_scores(round_for(Branchy()))
    assert not isinstance(caught.value, TargetReached)
    head_only = nn.Sequential(nn.Conv2d(2, 4, 1))  # its channels are the model output
    with pytest.raises(TargetReached, match="no layer the channel graph follows has a channel left"):
        ChannelCoupling().before_scores(round_for(head_only, "0.weight"))
