"""Per-layer targets: sparsity.layers overrides and allocation erk (core/allocation.py, the prune stage)."""

import math
from pathlib import Path

import pytest

from sparsify.core.allocation import check_one_round, erk_targets, layer_targets, match_overrides
from sparsify.errors import SparsifyError
from sparsify.io.checkpoint import load_checkpoint

SHAPES = {"a": (16, 3, 3, 3), "b": (32, 16, 3, 3), "c": (64, 32, 3, 3), "d": (128, 64, 3, 3)}


def zero_weights(targets, shapes, groups):
    """Weights the targets zero: floor(t * G) groups of numel / G weights per layer."""
    return sum(math.floor(t * groups[n] + 1e-9) * math.prod(shapes[n]) / groups[n] for n, t in targets.items())


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.9])
@pytest.mark.parametrize("group", [1, 64])
def test_erk_targets_zero_the_model_wide_share_within_one_group(target, group):
    groups = {n: math.prod(s) // group for n, s in SHAPES.items()}
    targets = erk_targets(SHAPES, groups, target, {})
    total = sum(math.prod(s) for s in SHAPES.values())
    assert abs(zero_weights(targets, SHAPES, groups) - target * total) <= group
    assert all(t * groups[n] == pytest.approx(round(t * groups[n])) for n, t in targets.items())  # whole groups


def test_erk_density_follows_sum_over_product_of_the_shape():
    shapes = {"small": (64, 64, 3, 3), "big": (256, 256, 3, 3)}
    groups = {n: math.prod(s) for n, s in shapes.items()}
    targets = erk_targets(shapes, groups, 0.8, {})
    ratio = (1 - targets["small"]) / (1 - targets["big"])
    score = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert ratio == pytest.approx(score["small"] / score["big"], rel=1e-3)


def test_a_layer_whose_density_would_exceed_one_stays_dense_and_the_rest_is_shared_again():
    shapes = {"tiny": (8, 3, 1, 1), "big": (256, 256, 3, 3), "mid": (128, 128, 3, 3)}
    groups = {n: math.prod(s) for n, s in shapes.items()}
    targets = erk_targets(shapes, groups, 0.5, {})
    assert targets["tiny"] == 0.0  # its ERK density (8+3+2)/24 > 1: capped at dense
    total = sum(math.prod(s) for s in shapes.values())
    assert zero_weights(targets, shapes, groups) == pytest.approx(0.5 * total, abs=1)
    assert (1 - targets["mid"]) / (1 - targets["big"]) == pytest.approx((128 * 2 + 6) / 128 ** 2 * 256 ** 2 / (256 * 2 + 6), rel=1e-3)


def test_erk_keeps_overrides_and_distributes_the_rest():
    groups = {n: math.prod(s) for n, s in SHAPES.items()}
    targets = layer_targets(SHAPES, groups, target=0.6, allocation="erk", overrides={"a": 0.0, "c": 0.9})
    assert targets["a"] == 0.0 and targets["c"] == 0.9
    total = sum(math.prod(s) for s in SHAPES.values())
    assert abs(zero_weights(targets, SHAPES, groups) - 0.6 * total) <= 1


def test_uniform_gives_every_layer_without_override_the_model_wide_target():
    groups = dict.fromkeys(SHAPES, 10)
    assert layer_targets(SHAPES, groups, target=0.5, allocation="uniform", overrides={"c": 0.9}) == \
        {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.5}


def test_the_first_matching_glob_wins():
    names = ["layer1.conv.weight", "layer4.conv.weight", "layer4.fc.weight"]
    chosen = match_overrides(names, {"layer4.conv.*": 0.0, "layer4.*": 0.9})
    assert chosen == {"layer4.conv.weight": 0.0, "layer4.fc.weight": 0.9}


def test_a_glob_matching_no_eligible_layer_is_refused_with_a_few_names():
    with pytest.raises(SparsifyError, match=r"'conv9\.\*' matches no eligible layer; eligible layers are a, b, c, d"):
        match_overrides(list(SHAPES), {"a": 0.0, "conv9.*": 0.5})


def test_overrides_that_leave_erk_nothing_to_meet_the_target_are_refused():
    groups = {n: math.prod(s) for n, s in SHAPES.items()}
    with pytest.raises(SparsifyError, match="cannot meet the model-wide target"):
        erk_targets(SHAPES, groups, 0.1, {"d": 0.9})


# ---------------------------------------------------------------- through the CLI on the tiny run


def prune_until_target(cli) -> list[int]:
    codes = [cli("download", "-c", "tiny.yaml")[0]]
    while codes[-1] == 0 and len(codes) < 12:
        codes.append(cli("prune", "-c", "tiny.yaml")[0])
    return codes


def last_pruned():
    return load_checkpoint(sorted(Path("runs/tiny/checkpoints").glob("*-pruned.safetensors"))[-1])


UNCONSTRAINED = {"keep_rows": False, "keep_cols": False}


def test_cli_overrides_are_obeyed_exactly(tiny_config, cli):
    tiny_config(sparsity={"target": 0.5, "step": 0.5, **UNCONSTRAINED,
                          "layers": {"layer1.0.conv1.weight": 0.0, "layer3.0.conv2.weight": 0.9}})
    codes = prune_until_target(cli)
    assert codes[0] == 0 and codes[-1] == 3 and set(codes[1:-1]) == {0}
    ckpt = last_pruned()
    assert bool(ckpt.masks["layer1.0.conv1.weight"].all())  # 0.0: fully dense
    conv = ckpt.masks["layer3.0.conv2.weight"]
    assert int((~conv.bool()).sum()) == math.floor(0.9 * conv.numel())  # 57 of 64 blocks
    for name, mask in ckpt.masks.items():
        if name not in ("layer1.0.conv1.weight", "layer3.0.conv2.weight"):
            assert int((~mask.bool()).sum()) == math.floor(0.5 * mask.numel()), name
    assert ckpt.meta["layer_targets"]["layer3.0.conv2.weight"] == 0.9


def test_cli_erk_meets_the_model_wide_target_within_one_block(tiny_config, cli):
    tiny_config(sparsity={"target": 0.6, "step": 0.5, "allocation": "erk", **UNCONSTRAINED,
                          "layers": {"layer1.0.conv1.weight": 0.0}})
    codes = prune_until_target(cli)
    assert codes[-1] == 3
    ckpt = last_pruned()
    targets = ckpt.meta["layer_targets"]
    assert targets["layer1.0.conv1.weight"] == 0.0 and bool(ckpt.masks["layer1.0.conv1.weight"].all())
    zeros = total = block = 0
    for name, mask in ckpt.masks.items():
        weight = ckpt.state[name]
        assert int((~mask.bool()).sum()) == math.floor(targets[name] * mask.numel() + 1e-9), name
        zeros += int((weight == 0).sum())
        total += weight.numel()
        block = max(block, weight.numel() // mask.numel())  # 8x8 blocks of a 3x3 conv: 576 weights
    assert abs(zeros - 0.6 * total) <= block
    assert len(set(targets.values())) > 2  # layers of other shapes got other targets


def test_cli_glob_matching_nothing_is_one_line_and_exit_1(tiny_config, cli):
    tiny_config(sparsity={"layers": {"layer9.*": 0.5}})
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    code, out, err = cli("prune", "-c", "tiny.yaml")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "'layer9.*' matches no eligible layer" in err and "layer1.0.conv1.weight" in err
    assert not list(Path("runs/tiny/checkpoints").glob("*-pruned.safetensors"))


def test_cli_nm_layer_at_zero_stays_dense(tiny_config, cli):
    tiny_config(sparsity={"pattern": {"type": "nm", "n": 2, "m": 4}, "layers": {"layer1.0.conv1.weight": 0.0}})
    codes = prune_until_target(cli)
    assert codes == [0, 0, 3]
    ckpt = last_pruned()
    assert bool(ckpt.masks["layer1.0.conv1.weight"].all())
    conv = ckpt.masks["layer1.0.conv2.weight"]
    assert int((~conv.bool()).sum()) == conv.numel() // 2


def test_one_round_patterns_take_dense_or_their_own_target_only():
    check_one_round({"a": 0.0, "b": 0.5}, pattern_target=0.5, allocation="uniform")
    with pytest.raises(SparsifyError, match="either dense \\(0.0\\) or at 0.5"):
        check_one_round({"a": 0.7}, pattern_target=0.5, allocation="uniform")
    with pytest.raises(SparsifyError, match="use allocation: uniform"):
        check_one_round({"a": 0.5}, pattern_target=0.5, allocation="erk")


def test_report_shows_each_layers_target_after_finetuning(tiny_config, cli):
    tiny_config(sparsity={"target": 0.5, "step": 0.5, "layers": {"layer1.0.conv1.weight": 0.0}})
    assert cli("download", "-c", "tiny.yaml")[0] == 0 and cli("prune", "-c", "tiny.yaml")[0] == 0
    assert cli("train", "-c", "tiny.yaml", "--epochs", "1")[0] == 0
    code, out, _ = cli("report", "runs/tiny")
    assert code == 0 and "target" in out.split("layers", 1)[1].splitlines()[2]
    row = next(line for line in out.splitlines() if line.startswith("layer1.0.conv1.weight"))
    assert "0.00%" in row.split()[4] and "50.00%" in next(
        line for line in out.splitlines() if line.startswith("layer1.0.conv2.weight")).split()[4]
