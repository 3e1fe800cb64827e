"""`sparsify sensitivity` and `sparsity.allocation: sensitivity`: the allocation math on hand-checkable
curves, the scan end to end on the tiny model (resume, fresh start, formats), prune with the allocation,
and the refusals."""

import csv
import io
import json
import math
import subprocess
import sys

import pytest
import torch

from sparsify.core.allocation import cheapest_levels, hull_corners, layer_targets, sensitivity_targets
from sparsify.errors import SparsifyError

# ---------------------------------------------------------------- the allocation math

CHEAP = [(0.5, 0.1), (0.9, 0.2)]  # loss increase at levels 0.5 and 0.9
DEAR = [(0.5, 1.0), (0.9, 3.0)]


def test_the_least_sensitive_layer_takes_the_most_zeros_and_the_targets_meet_the_model_wide_one():
    weights, groups = {"a": 640, "b": 640}, {"a": 10, "b": 10}
    targets = sensitivity_targets(weights, groups, 0.5, {}, {"a": CHEAP, "b": DEAR})
    # a's segments cost 0.1/320 and 0.1/256 per zeroed weight, b's first 1.0/320: a goes to 0.9 (576
    # weights), b gives the other 64 weights of the 640 the target asks for (one group, 0.1)
    assert targets == {"a": 0.9, "b": 0.1}
    assert sum(targets[n] * weights[n] for n in weights) == pytest.approx(0.5 * 1280)


def test_the_layer_whose_segment_is_cut_takes_an_interpolated_level():
    levels = cheapest_levels({"a": CHEAP, "b": DEAR}, {"a": 640, "b": 640}, 0.3 * 1280)
    assert levels == {"a": pytest.approx(0.6), "b": 0.0}  # 320 weights at 0.5, 64 more of a's next segment


def test_curves_are_read_as_their_lower_convex_hull_with_gains_taken_as_noise():
    assert hull_corners([(0.25, 0.5), (0.5, 0.6)]) == [(0.0, 0.0), (0.5, 0.6)]  # (0.25, 0.5) is above the chord
    assert hull_corners([(0.5, -0.1), (0.9, 0.2)]) == [(0.0, 0.0), (0.5, 0.0), (0.9, 0.2)]  # a gain counts as 0
    assert hull_corners([(0.9, 0.3), (0.5, 0.4)]) == [(0.0, 0.0), (0.9, 0.4)]  # the increase never falls with the level


@pytest.mark.parametrize("target", [0.2, 0.45, 0.7])
def test_whole_group_targets_land_within_one_group_of_the_model_wide_target(target):
    shapes = {"a": (16, 16, 3, 3), "b": (32, 16, 3, 3), "c": (64, 32, 3, 3), "d": (64, 64, 3, 3)}
    groups = {"a": 4, "b": 8, "c": 32, "d": 64}  # 8x8 blocks
    curves = {"a": [(0.5, 0.3), (0.75, 0.9)], "b": [(0.5, 0.2), (0.9, 0.5)],
              "c": [(0.25, 0.01), (0.5, 0.05), (0.9, 0.4)], "d": [(0.5, 0.02), (0.9, 0.1)]}
    targets = layer_targets(shapes, groups, target=target, allocation="sensitivity", overrides={}, curves=curves)
    weights = {n: math.prod(s) for n, s in shapes.items()}
    zeros = sum(round(t * groups[n]) * weights[n] / groups[n] for n, t in targets.items())
    assert abs(zeros - target * sum(weights.values())) <= 576  # one 8x8 block of a 3x3 conv
    assert all(t * groups[n] == pytest.approx(round(t * groups[n])) for n, t in targets.items())  # whole groups
    assert targets["d"] >= targets["c"] >= targets["a"]  # the cheapest per zeroed weight first


def test_overrides_win_and_the_other_layers_share_the_rest():
    shapes = {"a": (8, 8, 1, 10), "b": (8, 8, 1, 10), "c": (8, 8, 1, 10)}  # 640 weights each
    groups = dict.fromkeys(shapes, 10)
    curves = {"a": CHEAP, "b": DEAR, "c": CHEAP}
    targets = layer_targets(shapes, groups, target=0.4, allocation="sensitivity", overrides={"c": 0.0}, curves=curves)
    assert targets == {"a": 0.9, "b": 0.3, "c": 0.0}  # 768 zeros: a 576, b the 192 left


def test_levels_that_cannot_reach_the_target_and_missing_curves_are_one_line_each():
    with pytest.raises(SparsifyError, match=r"scan a higher level, e\.g\. `sparsify sensitivity -c CFG --levels"):
        sensitivity_targets({"a": 100, "b": 100}, {"a": 10, "b": 10}, 0.95, {}, {"a": CHEAP, "b": DEAR})
    with pytest.raises(SparsifyError, match="no measured curve for b .* run `sparsify sensitivity -c CFG` first"):
        sensitivity_targets({"a": 100, "b": 100}, {"a": 10, "b": 10}, 0.5, {}, {"a": CHEAP})


# ---------------------------------------------------------------- the command end to end

SCAN = ["sensitivity", "-c", "tiny.yaml", "--levels", "0.5,0.9", "--batches", "1"]


def eligible_layers() -> list[str]:
    from sparsify.core.patterns import build_pattern
    from sparsify.core.prune import find_layers
    from sparsify.io.restore import load_run
    from sparsify.io.rundir import RunDir

    loaded = load_run(RunDir("runs/tiny"))
    layers = find_layers(loaded.model, build_pattern({"type": "block", "block": [8, 8]}), include_linear=False,
                         exclude=[])
    return [layer.name for layer in layers if layer.reason is None]


def progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sensitivity: ") and "/" in line.split()[1]]


@pytest.fixture
def scanned(workdir, cli):
    """The tiny run downloaded and scanned once: (its sensitivity.json, the scan's stdout, stderr)."""
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    code, out, err = cli(*SCAN)
    assert code == 0, err
    return json.loads((workdir / "runs/tiny/sensitivity.json").read_text()), out, err


def test_the_scan_writes_every_eligible_layer_at_every_level_and_prints_the_table(scanned):
    data, out, err = scanned
    names = eligible_layers()
    assert [e["layer"] for e in data["layers"]] == names
    assert len(progress_lines(err)) == len(names)
    base = data["baseline"]
    for entry in data["layers"]:
        assert [p["level"] for p in entry["levels"]] == [0.5, 0.9]
        for point in entry["levels"]:
            assert point["acc1_drop"] == pytest.approx(base["acc1"] - point["acc1"], abs=1e-4)
            assert point["loss_drop"] == pytest.approx(point["loss"] - base["loss"], abs=1e-6)
            assert point["sparsity"] <= point["level"] + 1e-9
    assert data["key"]["levels"] == [0.5, 0.9] and data["key"]["batches"] == 1
    allocation = data["allocation"]
    assert set(allocation["layers"]) == set(names) and allocation["target"] == 0.5
    lines = out.splitlines()
    assert lines[0].startswith("sensitivity of 000-r00-pretrained.safetensors on 1 validation batch(es)")
    assert "@0.5" in lines[1] and "@0.9" in lines[1] and "allocated" in lines[1]
    assert [line.split()[0] for line in lines[2:-1]] == names
    assert lines[-1].startswith("allocation for target 50.0% of the eligible weights")
    from sparsify.report.series import sensitivity_curves

    assert sensitivity_curves(data)[0] == "acc1_drop"  # the report's figure reads it


def test_a_measurement_is_the_layer_pruned_alone_and_evaluated_on_the_same_batches(workdir, cli):
    """Without BatchNorm re-estimation, one point recomputed by hand: prune_layer to the level, then the loss."""
    from sparsify.config import load_config
    from sparsify.core.criteria import ScoreInputs
    from sparsify.core.patterns import build_pattern
    from sparsify.core.prune import PruneSettings, prune_layer
    from sparsify.io.restore import load_run
    from sparsify.io.rundir import RunDir
    from sparsify.stages.run import checkpoint_loaders

    assert cli("download", "-c", "tiny.yaml")[0] == 0
    assert cli(*SCAN, "--set", "sparsity.recalibrate_bn=0", "--set", "sparsity.criterion=l1")[0] == 0
    data = json.loads((workdir / "runs/tiny/sensitivity.json").read_text())
    name = "layer3.0.conv1.weight"
    point = next(e for e in data["layers"] if e["layer"] == name)["levels"][0]
    loaded = load_run(RunDir("runs/tiny"))
    pattern = build_pattern({"type": "block", "block": [8, 8]})
    weight = loaded.model.get_parameter(name)
    settings = PruneSettings(pattern=pattern, criterion="l1", step=1.0, layer_targets={name: 0.5})
    mask, entry = prune_layer(name, weight.detach(), torch.ones(8, 4, dtype=torch.bool), settings,
                              inputs=ScoreInputs(name, 0, 1, None, None))
    assert entry.zeros_after == 16 and point["groups_zero"] == 16 and point["sparsity"] == 0.5
    with torch.no_grad():
        weight.mul_(pattern.expand(mask, tuple(weight.shape)))
    config = load_config("tiny.yaml", [])
    images, target = next(iter(checkpoint_loaders(config, loaded.checkpoint.meta, seed=0, pin_memory=False)[1]))
    with torch.no_grad():
        logits = loaded.model.eval()(images)
    assert point["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), abs=2e-6)
    assert point["acc1"] == pytest.approx(100.0 * float((logits.argmax(1) == target).float().mean()), abs=1e-4)


def test_a_rerun_keeps_what_was_measured_and_measures_only_the_rest(scanned, workdir, cli):
    data, _, _ = scanned
    path = workdir / "runs/tiny/sensitivity.json"
    code, _, err = cli(*SCAN)
    assert code == 0 and progress_lines(err) == [] and f"{len(data['layers'])} measured before" in err
    assert json.loads(path.read_text()) == data
    cut = {**data, "layers": data["layers"][:5]}  # as if the scan had stopped after five layers
    path.write_text(json.dumps(cut))
    code, _, err = cli(*SCAN)
    assert code == 0 and len(progress_lines(err)) == 3 and progress_lines(err)[0].startswith("sensitivity: 6/8")
    assert json.loads(path.read_text()) == data  # the same figures as the scan in one go


def test_other_levels_start_afresh(scanned, workdir, cli):
    code, _, err = cli("sensitivity", "-c", "tiny.yaml", "--levels", "0.75", "--batches", "1")
    assert code == 0 and "measured with other settings or another checkpoint; measuring again" in err
    data = json.loads((workdir / "runs/tiny/sensitivity.json").read_text())
    assert data["key"]["levels"] == [0.75] and all(len(e["levels"]) == 1 for e in data["layers"])
    assert len(progress_lines(err)) == len(data["layers"])


def test_csv_and_json_formats(scanned, cli):
    data, _, _ = scanned
    code, out, _ = cli(*SCAN, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 2 * len(data["layers"])
    assert rows[1]["layer"] == data["layers"][0]["layer"] and float(rows[1]["level"]) == 0.9
    assert float(rows[1]["acc1_drop"]) == data["layers"][0]["levels"][1]["acc1_drop"]
    code, out, _ = cli(*SCAN, "-f", "json")
    assert code == 0 and json.loads(out) == data


def test_prune_with_allocation_sensitivity_meets_the_model_wide_target(scanned, workdir, cli):
    from sparsify.io.checkpoint import load_checkpoint

    data, _, _ = scanned
    allocated = data["allocation"]["layers"]
    code, out, err = cli("prune", "-c", "tiny.yaml", "--set", "sparsity.allocation=sensitivity",
                         "--set", "sparsity.step=1.0")
    assert code == 0, err
    checkpoint = load_checkpoint(workdir / "runs/tiny/checkpoints/001-r01-pruned.safetensors")
    assert checkpoint.meta["layer_targets"] == allocated
    zeros = sum(int((checkpoint.state[n] == 0).sum()) for n in allocated)
    total = sum(checkpoint.state[n].numel() for n in allocated)
    assert abs(zeros - 0.5 * total) <= 576  # within one 8x8 block of a 3x3 conv
    assert f"sparsity {zeros / total:.2%} of eligible weights" in out
    code, _, err = cli("prune", "-c", "tiny.yaml", "--set", "sparsity.allocation=sensitivity")
    assert code == 3 and "every eligible layer is at its own target" in err


def test_prune_without_a_scan_or_with_a_stale_one_is_one_line_and_writes_nothing(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    code, out, err = cli("prune", "-c", "tiny.yaml", "--set", "sparsity.allocation=sensitivity")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["error: sparsity.allocation sensitivity: runs/tiny/sensitivity.json is "
                                        "missing; run `sparsify sensitivity -c CFG` first"]
    assert len(list((workdir / "runs/tiny/checkpoints").iterdir())) == 1
    assert cli(*SCAN)[0] == 0
    code, _, err = cli("prune", "-c", "tiny.yaml", "--set", "sparsity.allocation=sensitivity",
                       "--set", "sparsity.exclude=['layer1.*']")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "does not match the eligible layers (has layer1.0.conv1.weight, not eligible now; 8 measured, " \
           "6 eligible); run `sparsify sensitivity -c CFG` first" in err
    assert len(list((workdir / "runs/tiny/checkpoints").iterdir())) == 1


@pytest.mark.parametrize("levels", ["0.5,1.0", "0", "half", ""])
def test_bad_levels_are_one_line_before_anything_runs(workdir, cli, levels):
    code, out, err = cli("sensitivity", "-c", "tiny.yaml", "--levels", levels)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert f"--levels {levels!r} is not a list of levels; give shares in (0, 1)" in err


def test_two_gloo_processes_split_the_layers_and_write_what_one_process_writes(workdir, cli):
    assert cli("download", "-c", "tiny.yaml")[0] == 0
    assert cli(*SCAN)[0] == 0
    path = workdir / "runs/tiny/sensitivity.json"
    one = json.loads(path.read_text())
    path.unlink()
    done = subprocess.run([sys.executable, "-m", "sparsify", *SCAN, "--nproc", "2"], cwd=workdir,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stderr and len(progress_lines(done.stderr)) == 4  # two layers at a time
    two = json.loads(path.read_text())
    assert [e["layer"] for e in two["layers"]] == [e["layer"] for e in one["layers"]]
    for a, b in zip(one["layers"], two["layers"]):
        for p, q in zip(a["levels"], b["levels"]):
            assert p.keys() == q.keys() and p["groups_zero"] == q["groups_zero"]
            assert p["loss"] == pytest.approx(q["loss"], abs=1e-5) and p["acc1"] == q["acc1"]
    assert two["allocation"]["layers"] == one["allocation"]["layers"]
