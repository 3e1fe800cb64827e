"""`sparsify report --plot DIR`: the series the figures draw (hand-made inputs, exact), what the figures
show (their bars, lines and pixels), and the files written for a real tiny run, with and without the
run's bench.json and sensitivity.json, and without matplotlib."""

from __future__ import annotations

import io
import json
import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import invoke
from report_run import BENCH, colours, make_run
from sparsify.errors import SparsifyError
from sparsify.report import figures, plots, series

DEFAULT_MASKS = ["layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer3.0.conv1.weight", "layer3.0.conv2.weight"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report-run"))


def written(folder) -> set[str]:
    return {path.name for path in folder.iterdir()}


def file_set(names: list[str]) -> set[str]:
    return {f"{name}.{ext}" for name in names for ext in ("png", "svg")}


# ---------------------------------------------------------------- series (no matplotlib)


def test_round_points_take_the_last_top1_after_training_and_after_the_prune_apart():
    history = [
        {"round": 0, "stage": "pretrained", "checkpoint": "000-r00-pretrained.safetensors", "sparsity": 0.0,
         "val_acc1": None},
        {"round": 0, "stage": "trained", "checkpoint": "001-r00-trained.safetensors", "sparsity": 0.0, "val_acc1": 90.0},
        {"round": 1, "stage": "pruned", "checkpoint": "002-r01-pruned.safetensors", "sparsity": 0.2, "val_acc1": None},
        {"round": 1, "stage": "eval", "checkpoint": "002-r01-pruned.safetensors", "sparsity": 0.2, "val_acc1": 40.0},
        {"round": 1, "stage": "trained", "checkpoint": "003-r01-trained.safetensors", "sparsity": 0.2, "val_acc1": 87.0},
        {"round": 1, "stage": "eval", "checkpoint": "003-r01-trained.safetensors", "sparsity": 0.2, "val_acc1": 88.5},
        {"round": 2, "stage": "pruned", "checkpoint": "004-r02-pruned.safetensors", "sparsity": 0.36, "val_acc1": None},
        {"round": None, "stage": "broken"},
    ]
    assert series.round_points(history) == [
        {"round": 0, "sparsity": 0.0, "val_acc1": 90.0, "pruned_acc1": None},
        {"round": 1, "sparsity": 0.2, "val_acc1": 88.5, "pruned_acc1": 40.0},
        {"round": 2, "sparsity": 0.36, "val_acc1": None, "pruned_acc1": None},
    ]


def test_training_segments_continue_the_steps_of_the_stage_before_and_skip_rows_without_a_loss():
    rows = [{"round": "0", "start": "000", "step": "1", "loss": "2.0", "lr": "0.1"},
            {"round": "0", "start": "000", "step": "2", "loss": "1.5", "lr": "0.05"},
            {"round": "1", "start": "002", "step": "1", "loss": "1.0", "lr": "0.1"},
            {"round": "1", "start": "002", "step": "2", "loss": "", "lr": "0.1"},  # fp16 skipped the window
            {"round": "x", "start": "002", "step": "3", "loss": "0.7", "lr": "0.1"},  # damaged
            {"round": "1", "start": "002", "step": "4", "loss": "0.5", "lr": "0.01"}]
    assert series.training_segments(rows) == [
        {"round": 0, "start": "000", "begin": 0, "steps": [1, 2], "loss": [2.0, 1.5], "lr": [0.1, 0.05]},
        {"round": 1, "start": "002", "begin": 2, "steps": [3, 6], "loss": [1.0, 0.5], "lr": [0.1, 0.01]},
    ]


def test_sensitivity_curves_read_a_list_or_a_mapping_of_layers_and_nothing_else():
    listed = {"layers": [{"layer": "a", "levels": [{"level": 0.5, "acc1_drop": 2.0}, {"level": 0.25, "acc1_drop": 0.5}]},
                         {"layer": "b", "levels": [{"sparsity": 0.5, "acc1_drop": 9.0}]}]}
    assert series.sensitivity_curves(listed) == ("acc1_drop", {"a": [(0.25, 0.5), (0.5, 2.0)], "b": [(0.5, 9.0)]})
    mapped = {"layers": {"a": [{"level": 0.9, "val_loss": 1.25}]}}
    assert series.sensitivity_curves(mapped) == ("val_loss", {"a": [(0.9, 1.25)]})
    for unknown in ({"layers": 3}, [], {"layers": [{"layer": "a", "levels": [{"level": 0.5, "score": 1}]}]}):
        assert series.sensitivity_curves(unknown) == ("", {})


def test_bench_rows_without_the_keys_a_figure_needs_are_left_out():
    data = {"layers": [*BENCH["layers"], {"layer": "x", "batch": 1}, {"batch": 1, "chosen": "bsr", "speedup": 2.0}],
            "end_to_end": [*BENCH["end_to_end"], {"batch": 1, "model": "dense", "median_ms": 1.0}]}
    assert series.bench_layer_speedups(data) == [{k: r[k] for k in ("layer", "batch", "chosen", "speedup")}
                                                 for r in BENCH["layers"]]
    assert series.bench_end_to_end(data) == BENCH["end_to_end"]
    assert series.bench_layer_speedups({"end_to_end": []}) == [] and series.bench_end_to_end([1, 2]) == []


def layer_rows():
    return [{"parameter": "a.weight", "shape": "16x16x3x3", "groups": 4, "groups_kept": 2, "sparsity": 0.5,
             "eligible": "yes", "target": None},
            {"parameter": "big.weight", "shape": "64x64x3x3", "groups": 64, "groups_kept": 48, "sparsity": 0.25,
             "eligible": "yes", "target": 0.3},
            {"parameter": "fc.weight", "shape": "10x64", "groups": None, "groups_kept": None, "sparsity": 0.0,
             "eligible": "no: Linear layer", "target": None},
            {"parameter": "mid.weight", "shape": "32x16x3x3", "groups": 8, "groups_kept": 4, "sparsity": 0.5,
             "eligible": "yes", "target": None}]


def test_choose_layers_by_glob_or_the_largest_in_model_order_and_refuse_a_glob_matching_none():
    rows = layer_rows()
    assert series.choose_layers(rows, None, count=2) == ["big.weight", "mid.weight"]
    assert series.choose_layers(rows, "m*") == ["mid.weight"]
    assert series.choose_layers(rows, "a") == ["a.weight"]  # the name without .weight matches too
    with pytest.raises(SparsifyError, match=r"--layers 'fc\*' matches no layer with a mask; these have one: a.weight"):
        series.choose_layers(rows, "fc*")
    with pytest.raises(SparsifyError, match=r"--layers 'a': this checkpoint has no mask to draw \(it is dense\)"):
        series.choose_layers([{**row, "groups": None} for row in rows], "a")
    assert series.choose_layers([{**row, "groups": None} for row in rows], None) == []


def test_mask_grid_is_the_group_grid_or_the_share_of_taps_kept():
    block = torch.tensor([[True, False], [False, False]])
    grid, share = series.mask_grid(block)
    assert not share and grid.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    element = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    element[0, 1, 0, :] = True  # half the taps of (0, 1)
    element[1, 2] = True  # all of (1, 2)
    grid, share = series.mask_grid(element)
    assert share and grid.tolist() == [[0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]


# ---------------------------------------------------------------- what the figures show


def test_layer_bars_are_the_pruned_and_kept_shares_and_ineligible_layers_are_grey_with_the_reason():
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Rectangle

    figure = plots.layers_figure(layer_rows(), target=0.5)
    ax = figure.axes[0]
    bars = [(round(p.get_x(), 6), round(p.get_width(), 6), p.get_facecolor()[:3])
            for p in ax.patches if isinstance(p, Rectangle)]
    orange, blue, grey = (to_rgb(c) for c in (plots.PRUNED, plots.KEPT, plots.DENSE))
    assert bars == [(0, 50, orange), (50, 50, blue), (0, 25, orange), (25, 75, blue), (0, 100, grey),
                    (0, 50, orange), (50, 50, blue)]
    assert "not eligible: Linear layer" in [t.get_text() for t in ax.texts]
    ticks = [line.get_xdata()[0] for line in ax.lines]  # each layer's target: its own (30%) or the run's
    assert ticks == [50, 30, 50]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "big", "fc", "mid"]


def test_rounds_figure_draws_top1_after_training_the_dense_line_and_sparsity_bars():
    points = [{"round": 0, "sparsity": 0.0, "val_acc1": 90.0, "pruned_acc1": None},
              {"round": 1, "sparsity": 0.2, "val_acc1": 88.5, "pruned_acc1": 40.0}]
    figure = plots.rounds_figure(points, dense_acc1=90.0, target=0.5)
    top, bottom = figure.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in top.lines}
    assert lines["after training"] == ([0, 1], [90.0, 88.5])
    assert lines["right after prune"] == ([1], [40.0])
    assert lines["dense 90.00%"][1] == [90.0, 90.0]
    assert [round(p.get_height(), 6) for p in bottom.patches] == [0.0, 20.0]


def rgb(colour: str) -> list[int]:
    """'#3b6ea5' as [59, 110, 165]."""
    return [int(colour[i:i + 2], 16) for i in (1, 3, 5)]


def kept_share_in_pixels(png: bytes) -> tuple[float, float, float]:
    """(share of the mask colours that are 'kept', mean x of kept pixels, mean x of pruned pixels)."""
    import numpy
    from PIL import Image

    image = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    pixels = torch.from_numpy(image.copy()).reshape(-1, 3).int()
    xs = torch.arange(len(pixels)) % image.shape[1]
    kept = (pixels == torch.tensor(rgb(plots.KEPT))).all(1)
    pruned = (pixels == torch.tensor(rgb(plots.PALE))).all(1)
    return (int(kept.sum()) / int(kept.sum() + pruned.sum()), float(xs[kept].float().mean()),
            float(xs[pruned].float().mean()))


def test_a_mask_picture_shows_the_kept_groups_where_they_are():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :2] = True  # the first two input blocks kept: a quarter, on the left
    grid, share = series.mask_grid(mask)
    with figures.style():
        figure = plots.mask_figure("x.weight", grid, share=share, weight_shape="64x64x3x3", pattern="block 8x8")
    kept, kept_x, pruned_x = kept_share_in_pixels(figures.png_bytes(figure))
    assert kept == pytest.approx(0.25, abs=0.02)
    assert kept_x < pruned_x
    assert "25.0% kept" in figure.axes[0].get_title()


# ---------------------------------------------------------------- sparsify report --plot on a real run


def check_images(folder, names):
    for name in names:
        png = (folder / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and colours(png) >= 5, name
        assert ET.parse(folder / f"{name}.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg", name


def test_plot_writes_each_figure_as_png_and_svg(run, tmp_path):
    code, out, err = invoke("report", run, "--plot", tmp_path / "figs")
    assert code == 0, err
    names = ["rounds", "layers", "training", *(f"mask-{name}" for name in DEFAULT_MASKS)]
    assert written(tmp_path / "figs") == file_set(names)
    check_images(tmp_path / "figs", names)
    assert err.strip() == f"wrote 7 figures to {tmp_path / 'figs'} (PNG and SVG each)"
    assert out.rstrip().splitlines()[-1].startswith("final: 50.00% of eligible weights zero")  # the table as before


def test_layers_glob_chooses_the_mask_pictures(run, tmp_path):
    code, _, err = invoke("report", run, "--plot", tmp_path, "--layers", "layer1.*", "-f", "json")
    assert code == 0, err
    assert sorted(n for n in written(tmp_path) if n.startswith("mask-")) == sorted(
        file_set(["mask-layer1.0.conv1.weight", "mask-layer1.0.conv2.weight"]))


def test_bench_and_sensitivity_files_add_their_figures(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "bench.json").write_text(json.dumps(BENCH))
    (copy / "sensitivity.json").write_text(json.dumps(
        {"layers": [{"layer": "layer1.0.conv1.weight", "levels": [{"level": 0.5, "acc1_drop": 1.0},
                                                                  {"level": 0.9, "acc1_drop": 5.0}]}]}))
    code, _, err = invoke("report", copy, "--plot", tmp_path / "figs", "--layers", "layer3.0.conv2")
    assert code == 0, err
    names = ["rounds", "layers", "training", "mask-layer3.0.conv2.weight", "sensitivity", "bench-layers",
             "bench-end-to-end"]
    assert written(tmp_path / "figs") == file_set(names)
    check_images(tmp_path / "figs", names[-3:])


def test_side_files_that_cannot_be_drawn_are_skipped_with_a_note(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "bench.json").write_text(json.dumps({"layers": [{"layer": "x"}], "end_to_end": BENCH["end_to_end"]}))
    (copy / "sensitivity.json").write_text("{not json")
    code, _, err = invoke("report", copy, "--plot", tmp_path / "figs", "-f", "csv")
    assert code == 0, err
    assert "bench-end-to-end.png" in written(tmp_path / "figs")
    assert not {"bench-layers.png", "sensitivity.png"} & written(tmp_path / "figs")
    assert f"{copy / 'sensitivity.json'} is not readable JSON (JSONDecodeError); its figures are skipped" in err
    assert f"{copy / 'bench.json'} has no per-layer timings with the keys the figures need; skipped" in err


def test_refusals_are_one_line_and_write_nothing(run, tmp_path, monkeypatch):
    code, out, err = invoke("report", run, "--plot", tmp_path / "figs", "--layers", "nothing*")
    assert (code, out) == (1, "") and err.count("\n") == 1 and "--layers 'nothing*' matches no layer" in err
    (tmp_path / "file").write_text("")
    code, _, err = invoke("report", run, "--plot", tmp_path / "file")
    assert code == 1 and err.startswith(f"error: --plot {tmp_path / 'file'} is a file")
    code, _, err = invoke("report", run, "--layers", "layer1.*")
    assert code == 1 and "--layers chooses the mask pictures of --plot DIR and --format html" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = invoke("report", run, "--plot", tmp_path / "figs")
    assert (code, out) == (1, "")
    assert err == "error: figures need matplotlib, which is not installed: pip install 'sparsify-cnn[plot]'\n"
    assert written(tmp_path) == {"file"}
