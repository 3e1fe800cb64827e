"""`sparsify bench`: multiply-adds counted by hand, the interleaved timer, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsify.stages.costs import layer_costs, model_costs
from sparsify.runtime.timing import interleaved_times


def test_layer_costs_count_macs_by_hand():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:2] = 1.0  # half the filters kept: 2 x 2 x 3 x 3 = 36 nonzeros
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    rows = layer_costs(model, torch.zeros(7, 2, 5, 5))  # the batch size does not change per-image figures
    assert [row["layer"] for row in rows] == ["0", "2"]
    assert rows[0]["macs"] == 5 * 5 * 4 * 2 * 9 and rows[0]["effective_macs"] == 5 * 5 * 36
    assert rows[1]["macs"] == 100 * 3 and rows[1]["params"] == 300
    totals = model_costs(model, rows)
    assert totals["macs"] == 1800 + 300
    assert totals["params"] == 72 + 300 + 3


def test_layer_costs_count_grouped_convs_and_tokens():
    depthwise = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)
    rows = layer_costs(depthwise, torch.zeros(1, 4, 6, 6))
    assert rows[0]["macs"] == 3 * 3 * 4 * 9  # 3x3 output positions, 36 weights each
    linear = nn.Linear(8, 2)
    assert layer_costs(linear, torch.zeros(1, 5, 8))[0]["macs"] == 5 * 16  # 5 tokens


def test_interleaved_times_rotate_the_order_and_repeat_short_calls():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(candidates, runs=3, warmup=1, min_sample_s=0.0)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(t["samples"] == 3 and t["min"] <= t["median"] <= t["max"] for t in times.values())


@pytest.fixture
def pruned_run(workdir, cli):
    for command in ("download", "prune"):
        code, _, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, err
    return workdir / "runs" / "tiny"


def test_bench_command_writes_bench_json_and_report_shows_it(pruned_run, cli):
    code, out, err = cli("bench", "-c", "tiny.yaml", "--batch", "1,3", "--runs", "2", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((pruned_run / "bench.json").read_text())["end_to_end"] == result["end_to_end"]
    assert [(r["batch"], r["model"]) for r in result["end_to_end"]] == [
        (b, m) for b in (1, 3) for m in ("dense", "masked", "calibrated")]
    assert result["dense_source"] == "000-r00-pretrained.safetensors"
    assert result["costs"]["effective_macs"] < result["costs"]["macs"]
    layers = {row["layer"] for row in result["layers"]}
    assert layers and all(row["chosen"] in row["times_ms"] for row in result["layers"])
    assert (pruned_run / "calibration.json").is_file()
    code, out, err = cli("report", "-c", "tiny.yaml")
    assert code == 0, err
    assert "bench (001-r01-pruned.safetensors" in out and "batch 3 calibrated" in out


def test_bench_of_a_checkpoint_file_outside_a_run_writes_no_bench_json(pruned_run, cli, tmp_path):
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes((pruned_run / "checkpoints" / "001-r01-pruned.safetensors").read_bytes())
    code, out, err = cli("bench", str(stray), "--batch", "2", "--runs", "1")
    assert code == 0, err
    assert "fresh weights" in out and "written to" not in out
    assert not list(Path(tmp_path).glob("bench.json"))


@pytest.mark.parametrize("batch", ["0", "1,x", "", "1,,2"])
def test_bench_refuses_bad_batch_lists_in_one_line(pruned_run, cli, batch):
    code, out, err = cli("bench", "-c", "tiny.yaml", "--batch", batch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--batch" in err
    assert not (pruned_run / "bench.json").exists()


def test_bench_in_bfloat16_times_every_model_in_it_and_refuses_unknown_dtypes(pruned_run, cli, tmp_path):
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes((pruned_run / "checkpoints" / "001-r01-pruned.safetensors").read_bytes())
    code, out, err = cli("bench", str(stray), "--batch", "2", "--runs", "1", "--dtype", "bfloat16", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["environment"]["dtype"] == "bfloat16"
    assert {row["model"] for row in result["end_to_end"]} == {"dense", "masked", "calibrated"}
    assert all(row["chosen"] == "dense" and "bfloat16 on CPU" in row["skipped"]["bsr"]
               for row in result["layers"]), "the CPU sparse kernels multiply float32 only"
    code, out, err = cli("bench", str(stray), "--dtype", "int4")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "dtype 'int4'" in err
    code, out, err = cli("bench", str(stray), "--cuda-graph")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--cuda-graph needs --device cuda" in err
