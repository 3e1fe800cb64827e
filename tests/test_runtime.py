"""sparsify.runtime: executors against dense (the contract over every executor is in test_contracts.py),
the five layer modes, timing and calibration, the calibration file, and load() on real tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sparsify.core.block import BlockPattern
from sparsify.errors import SparsifyError
from sparsify.io.restore import load_run
from sparsify.io.rundir import RunDir
from sparsify.rounds.regroup import regroup_mask
from sparsify.runtime import apply_plan, calibrate_model, deploy, load, set_mode, sparse_layers
from sparsify.runtime.blockgemm import BlockGemm
from sparsify.runtime.blocks import row_groups
from sparsify.runtime.graphs import GraphedModel
from sparsify.runtime.layer import LayerTiming, SparseLayer
from sparsify.runtime.semistructured import SemiStructured
from sparsify.runtime.timing import TimingSettings, pick, time_candidates

CPU = torch.device("cpu")
REGROUP = {"pattern": {"type": "unstructured"}, "criterion": "l1", "keep_rows": False, "keep_cols": False,
           "regroup": {"enabled": True, "clusters": 2, "min_rows": 3}}


def block_mask(weight: torch.Tensor, keep: float, seed: int = 0) -> torch.Tensor:
    pattern, shape = BlockPattern(8, 8), tuple(weight.shape)
    groups = torch.rand(pattern.mask_shape(shape), generator=torch.Generator().manual_seed(seed)) < keep
    return pattern.expand(groups, shape)


def clustered_mask(shape: tuple[int, ...], *, clusters: int, keep: float, seed: int = 0) -> torch.Tensor:
    """Rows in `clusters` groups, each keeping its own random share `keep` of the columns (regroup's output)."""
    g = torch.Generator().manual_seed(seed)
    columns = int(np.prod(shape[1:]))
    mask = torch.zeros(shape[0], columns, dtype=torch.bool)
    for rows in torch.randperm(shape[0], generator=g).chunk(clusters):
        mask[rows[:, None], torch.randperm(columns, generator=g)[: max(1, int(keep * columns))][None]] = True
    return mask.reshape(shape)


def dense_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


# ---------------------------------------------------------------- executors


def test_semi_structured_says_what_it_needs():
    linear = nn.Linear(64, 32).half()
    two_four = torch.tensor([True, False, True, False]).repeat(32, 16)
    executor = SemiStructured()
    assert executor.applies(linear, two_four, CPU, torch.float16) == "needs CUDA"
    cuda = torch.device("cuda")  # applies() only reads the device type: no GPU needed
    assert "float16 or bfloat16" in executor.applies(linear, two_four, cuda, torch.float32)
    assert executor.applies(linear, two_four, cuda, torch.float16) is None
    assert "not 2:4" in executor.applies(linear, torch.ones(32, 64, dtype=torch.bool), cuda, torch.float16)
    conv = nn.Conv2d(64, 32, 3).half()
    assert "1x1 conv" in executor.applies(conv, two_four[:, :, None, None].expand(32, 64, 3, 3), cuda, torch.float16)
    assert "needs a multiple of" in executor.applies(nn.Linear(64, 8).half(), two_four[:8], cuda, torch.float16)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "linear_tokens", "pointwise_conv"])
def test_semi_structured_equals_dense_in_test_mode_on_cuda(kind, dtype):
    torch.manual_seed(0)
    module = nn.Conv2d(128, 64, 1) if kind == "pointwise_conv" else nn.Linear(128, 64)
    shape = (64, 128, 1, 1) if kind == "pointwise_conv" else (64, 128)
    mask = torch.tensor([True, False, False, True]).repeat(64, 32).reshape(shape)
    layer = SparseLayer(module.to("cuda", dtype), mask.cuda())
    layer.use("semi_structured")
    layer.mode = "test"  # raises when the sparse output is not the dense one within the dtype's tolerance
    x = {"linear": (32, 128), "linear_tokens": (4, 50, 128), "pointwise_conv": (8, 128, 7, 7)}[kind]
    out = layer(torch.randn(x, device="cuda", dtype=dtype))
    assert layer.executor.name == "semi_structured" and out.dtype == dtype
    assert out.shape == dense_output(module, torch.zeros(x, device="cuda", dtype=dtype)).shape


def test_a_regrouped_mask_gives_its_blocks_back_and_runs_without_remainder():
    mask2d = np.random.default_rng(0).random((48, 16 * 9)) < 0.3
    result = regroup_mask(mask2d, clusters=4, min_rows=3, split_rows=8)
    groups, empty = row_groups(result.mask)
    by_columns = {}
    for rows, columns in result.blocks:  # a cluster split in two blocks has the same columns twice
        by_columns.setdefault(tuple(columns), []).extend(rows.tolist())
    assert {(tuple(sorted(r)), c) for c, r in by_columns.items()} == \
        {(tuple(g.rows.tolist()), tuple(g.columns.tolist())) for g in groups}
    assert set(empty.tolist()) == set(range(48)) - {r for g in groups for r in g.rows.tolist()}
    conv = nn.Conv2d(16, 48, 3, padding=1)
    mask = torch.from_numpy(result.mask).reshape(conv.weight.shape)
    layer = SparseLayer(conv, mask)
    layer.use("blockgemm")
    assert not any(part.sparse for part in layer.executor.parts) and "100% of the kept weights" in \
        layer.executor.describe()
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(layer(x), dense_output(conv, x), rtol=1e-4, atol=1e-5)


def test_blockgemm_keeps_the_weights_outside_blocks_in_a_csr_remainder():
    conv = nn.Conv2d(8, 24, 3, padding=1, bias=False)
    mask = clustered_mask(tuple(conv.weight.shape), clusters=2, keep=0.3)
    mask[5] = torch.rand(8, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5  # one row of its own
    layer = SparseLayer(conv, mask)
    layer.use("blockgemm")
    sparse = [part for part in layer.executor.parts if part.sparse]
    assert len(sparse) == 1 and sparse[0].rows.tolist() == [5]
    assert sparse[0].weight._nnz() == int((conv.weight[5] != 0).sum())
    x = torch.randn(3, 8, 6, 6)
    assert torch.allclose(layer(x), dense_output(conv, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("limit, grid, chunk, threads", [(100.0, True, 1, 1), (1.0, False, 1 << 20, 2),
                                                         (100.0, True, 1, 2)])
def test_blockgemm_grid_and_exact_rows_and_image_chunks_give_the_same_output(limit, grid, chunk, threads):
    conv = nn.Conv2d(16, 32, 3, padding=1)  # 7x7 input: a grid row computes 9 x 9 positions for 7 x 7
    mask = clustered_mask(tuple(conv.weight.shape), clusters=4, keep=0.2)
    layer = SparseLayer(conv, mask)
    executor = BlockGemm()
    executor.grid_waste_limit = limit
    executor.prepare(conv, mask)
    executor.runner.chunk_elements = chunk  # 1: one image per chunk, on the worker threads when threads > 1
    layer.executor = executor
    x = torch.randn(5, 16, 7, 7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.allclose(layer(x), dense_output(conv, x), rtol=1e-4, atol=1e-5)
        with torch.inference_mode():  # as bench and calibration run it: the worker threads write inference tensors
            assert torch.allclose(layer(x), dense_output(conv, x), rtol=1e-4, atol=1e-5)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert executor.plan(7, 7)[0].grid is grid


def test_bsr_refuses_unstructured_masks_and_tiles_block_masks():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    unstructured = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    layer = SparseLayer(conv, unstructured)
    with pytest.raises(SparsifyError, match="cannot run layer .*do not form square blocks"):
        layer.use("bsr")
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = SparseLayer(conv, block_mask(conv.weight, 0.5))
    layer.use("bsr")
    assert layer.executor.describe().startswith("8x8 tiles storing 1.00x")


# ---------------------------------------------------------------- modes


def test_test_mode_refuses_an_executor_that_drops_weights_and_names_the_tolerance():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    mask = clustered_mask(tuple(conv.weight.shape), clusters=2, keep=0.5)
    layer = SparseLayer(conv, mask)
    short = mask.clone()
    short[short.reshape(16, -1).any(1).nonzero()[0, 0]] = False  # the executor loses one output channel
    executor = BlockGemm()
    executor.prepare(conv, short)
    layer.executor, layer.mode = executor, "test"
    with pytest.raises(SparsifyError, match=r"differs from dense: max \|difference\| .* over "
                                            r"torch.allclose\(rtol=0.0001, atol="):
        layer(torch.randn(1, 8, 5, 5))


def test_vanilla_benchmark_and_unknown_modes():
    conv = nn.Conv2d(16, 32, 1)
    layer = SparseLayer(conv, clustered_mask((32, 16, 1, 1), clusters=2, keep=0.25))
    model = nn.Sequential(layer)
    layer.use("blockgemm")
    x = torch.randn(2, 16, 5, 5)
    set_mode(model, "vanilla")
    assert torch.equal(model(x), dense_output(conv, x))
    set_mode(model, "benchmark")
    layer.settings = TimingSettings(budget_s=0.0, min_repeats=2, max_repeats=2, drop_factor=float("inf"))
    assert torch.allclose(model(x), dense_output(conv, x), rtol=1e-4, atol=1e-5)
    assert set(layer.last_benchmark.ms) == {"dense", "blockgemm"} and layer.last_benchmark.repeats == 2
    with pytest.raises(SparsifyError, match="unknown mode 'fast'; choose one of: vanilla, sparse, test"):
        set_mode(model, "fast")


def test_a_layer_rebuilds_its_executor_when_its_dtype_changes():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = SparseLayer(conv, clustered_mask(tuple(conv.weight.shape), clusters=2, keep=0.4))
    layer.use("blockgemm")
    layer.double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert layer.executor.name == "blockgemm" and layer(x).dtype == torch.float64
    assert torch.allclose(layer(x), dense_output(conv, x), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- timing and calibration


class Ticks:
    """A clock that moves only while a candidate runs, by that candidate's fixed cost: the timing decisions
    come out the same on an idle machine and on a loaded one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costing(self, seconds: float):
        def call() -> None:
            self.now += seconds

        return call


def test_time_candidates_drops_a_hopeless_candidate_and_adapts_its_repeats():
    ticks = Ticks()
    calls = {"dense": ticks.costing(0.001), "slow": ticks.costing(0.006), "other": ticks.costing(0.001)}
    slow = time_candidates(calls, TimingSettings(budget_s=10.0, min_repeats=3, max_repeats=6), clock=ticks)
    assert slow.repeats == 6 and slow.ms == pytest.approx({"dense": 1.0, "other": 1.0})
    assert slow.dropped == {"slow": "6 ms first call, over 2x dense; not timed further"}
    warmed = time_candidates(calls, TimingSettings(budget_s=0.0, min_repeats=3, max_repeats=50), clock=ticks,
                             warm={"dense": 0.001, "slow": 0.001, "other": 0.001})  # no drop before a timed run
    assert warmed.repeats == 3 and set(warmed.ms) == {"dense", "other"} and "timed run, over 1.5x" in \
        warmed.dropped["slow"]
    alone = time_candidates({"dense": calls["dense"], "slow": calls["slow"]}, clock=ticks,
                            settings=TimingSettings(budget_s=10.0, min_repeats=3, max_repeats=6))
    assert alone.repeats == 1 and set(alone.ms) == {"dense"}  # nothing left to compare dense with


def test_pick_needs_the_margin():
    assert pick({"dense": 10.0, "bsr": 9.8}, 0.03) == ("dense", "bsr was only 2.0% faster than dense "
                                                                "(a winner needs 3%)")
    assert pick({"dense": 10.0, "bsr": 8.0}, 0.03) == ("bsr", "1.25x faster than dense (8 vs 10 ms)")
    assert pick({"dense": 10.0, "bsr": 12.0}, 0.03) == ("dense", "dense was fastest (10 ms)")


def tiny_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    masks = {"0.weight": torch.rand(32, 3, 3, 3) < 0.5, "2.weight": torch.rand(32, 1, 3, 3) < 0.5,
             "4.weight": clustered_mask((64, 32, 1, 1), clusters=4, keep=0.1), "8.weight": block_mask(model[8].weight,
                                                                                                       0.5)}
    return model, masks


def test_calibration_keeps_only_executors_that_beat_dense_and_leaves_depthwise_dense():
    model, masks = tiny_model()
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():  # the reference: the dense model with its masks applied
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
        reference = model(x)
    calibration = calibrate_model(model, masks, x, repeats=4, budget_s=0.0)
    rows = {row.layer: row for row in calibration.layers}
    assert set(rows) == {"0", "2", "4", "8"} and rows["4"].input == [4, 32, 16, 16]
    assert rows["2"].chosen == "dense" and rows["2"].kind == "depthwise conv"
    assert "depthwise conv" in rows["2"].skipped["blockgemm"] and "depthwise conv" in rows["2"].skipped["bsr"]
    for row in rows.values():
        assert row.chosen in row.ms and "dense" in row.ms
        assert row.chosen == "dense" or row.ms[row.chosen] <= 0.97 * row.ms["dense"], row
        assert row.skipped["semi_structured"] == "needs CUDA"
    assert {name: layer.executor.name for name, layer in sparse_layers(model).items()} == calibration.plan
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparse_s, kept", [(0.5, True), (2.0, False)])
def test_the_whole_model_check_keeps_a_plan_only_where_it_is_not_slower(monkeypatch, sparse_s, kept):
    import sparsify.runtime.calibrate as calibrate

    seen = {}

    def whole_model_times(runs, **settings):
        for mode, call in runs.items():  # both modes really run: record the executors each used
            call()
            seen[mode] = {name: layer.mode for name, layer in sparse_layers(model).items()}
        return {"sparse": sparse_s, "vanilla": 1.0}

    monkeypatch.setattr(calibrate, "whole_model_times", whole_model_times)
    model, masks = tiny_model()
    layers = apply_plan(model.eval(), masks, {"4": "blockgemm"})
    rows = [LayerTiming(name, layer.kind, list(layer.weight.shape), [], 0.5, chosen=layer.executor.name)
            for name, layer in layers.items()]
    checked = calibrate.check_end_to_end(model, layers, rows, torch.randn(2, 3, 8, 8), rounds=3)
    assert checked == {"sparse_ms": sparse_s * 1e3, "dense_ms": 1000.0, "ratio": sparse_s, "rounds": 3, "kept": kept}
    assert set(seen["sparse"].values()) == {"sparse"} and set(seen["vanilla"].values()) == {"vanilla"}
    assert layers["4"].executor.name == ("blockgemm" if kept else "dense")
    row = next(row for row in rows if row.layer == "4")
    assert row.chosen == layers["4"].executor.name
    assert kept or "the whole model with the sparse plan took 2.000x the dense model: every layer dense" in row.why
    table = calibrate.Calibration({"batch": 2}, rows, 1.0, end_to_end=checked)
    assert calibrate.Calibration.from_json(json.loads(json.dumps(table.to_json()))).end_to_end == checked
    all_dense = [LayerTiming("4", "", [], [], 0.5)]
    assert calibrate.check_end_to_end(model, layers, all_dense, torch.randn(2, 3, 8, 8), rounds=3) is None


def test_the_whole_model_check_runs_each_model_once_per_round_alternating_and_takes_medians():
    from sparsify.runtime.calibrate import whole_model_times

    order = []
    runs = {"sparse": lambda: order.append("sparse"), "vanilla": lambda: order.append("vanilla")}
    times = whole_model_times(runs, rounds=3, sync=lambda: None)
    assert order == ["sparse", "vanilla", "vanilla", "sparse", "sparse", "vanilla"]  # no warm-up call
    assert set(times) == {"sparse", "vanilla"} and all(t >= 0 for t in times.values())


def test_calibration_skips_an_executor_that_fails_on_a_layer_and_says_why(monkeypatch):
    def broken(self, module, mask):
        raise RuntimeError("no kernel for this shape\nsecond line")

    monkeypatch.setattr(BlockGemm, "prepare", broken)
    conv = nn.Conv2d(16, 32, 1)
    mask = clustered_mask((32, 16, 1, 1), clusters=2, keep=0.25)
    model = nn.Sequential(conv)
    table = calibrate_model(model, {"0.weight": mask}, torch.randn(2, 16, 4, 4), repeats=2, budget_s=0.0)
    row = table.layers[0]
    assert row.skipped["blockgemm"] == "failed on this layer: RuntimeError: no kernel for this shape"
    assert "blockgemm" not in row.ms and row.chosen in row.ms


def test_a_plan_is_applied_as_given_or_refused():
    model, masks = tiny_model()
    layers = apply_plan(model, masks, {"4": "blockgemm", "8": "bsr"})
    assert {name: layer.executor.name for name, layer in layers.items()} == \
        {"0": "dense", "2": "dense", "4": "blockgemm", "8": "bsr"}
    with pytest.raises(SparsifyError, match="the plan names layer '6', which has no mask"):
        apply_plan(model, masks, {"6": "dense"})
    with pytest.raises(SparsifyError, match="executor 'bsr' cannot run layer 2: depthwise conv"):
        apply_plan(model, masks, {"2": "bsr"})


# ---------------------------------------------------------------- load() on real runs


@pytest.fixture
def pruned_run(workdir, cli):
    for command in ("download", "prune"):
        code, out, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, out + err
    return workdir / "runs" / "tiny"


def masked_reference(run_dir) -> nn.Module:
    loaded = load_run(RunDir(run_dir))
    model = loaded.model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in loaded.masks.items():
            params[name].mul_(loaded.pattern.expand(mask, tuple(params[name].shape)))
    return model


def test_load_gives_the_outputs_of_the_dense_masked_model(pruned_run):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = dense_output(masked_reference(pruned_run), x)
    keys = set(masked_reference(pruned_run).state_dict())
    for options in ({"calibrate": False}, {"executor": "blockgemm"}, {"executor": "bsr"},
                    {"batch": 3, "repeats": 2, "budget_s": 0.0}):
        deployed = deploy(pruned_run, **options)
        model, layers = deployed.model, sparse_layers(deployed.model)
        assert not model.training and set(model.state_dict()) == keys
        if deployed.calibration is None:
            assert len(layers) == 8
        else:  # the layers calibration keeps dense are plain layers again
            chosen = {row.layer for row in deployed.calibration.layers if row.chosen != "dense"}
            assert set(layers) == chosen and len(deployed.calibration.layers) == 8
        if "executor" in options:
            assert {layer.executor.name for layer in layers.values()} == {options["executor"]}
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5), options


@pytest.mark.parametrize("tiny_sections", [{"sparsity": REGROUP}])
def test_a_regrouped_run_runs_on_its_blocks(pruned_run):
    model = load(pruned_run, executor="blockgemm")
    described = [layer.executor.describe() for layer in sparse_layers(model).values()]
    assert described and all("100% of the kept weights" in text and "CSR" not in text for text in described)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), dense_output(masked_reference(pruned_run), x), rtol=1e-4, atol=1e-5)


def test_load_casts_to_the_dtype_asked_for_and_refuses_others_in_one_line(pruned_run):
    model = load(pruned_run, calibrate=False, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, 32, 32)
    expected = dense_output(masked_reference(pruned_run), x)
    assert torch.allclose(model(x.bfloat16()).float(), expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))
    with pytest.raises(SparsifyError, match="dtype 'int8' is not one sparsify runs models in; give one of float32"):
        load(pruned_run, dtype="int8")


def test_cuda_graphs_are_refused_off_cuda_in_one_line(pruned_run):
    with pytest.raises(SparsifyError, match="cuda_graph needs a CUDA device, got cpu"):
        deploy(pruned_run, cuda_graph=True)
    with pytest.raises(SparsifyError, match="CUDA graphs need an input on a CUDA device"):
        GraphedModel(nn.Linear(2, 2))(torch.randn(1, 2))


@CUDA_ONLY
def test_a_model_deployed_in_cuda_graphs_gives_the_masked_outputs(pruned_run):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = dense_output(masked_reference(pruned_run), x)
    deployed = deploy(pruned_run, device="cuda", batch=3, repeats=2, budget_s=0.0, cuda_graph=True)
    assert isinstance(deployed.model, GraphedModel) and deployed.calibration.key["cuda_graph"] is True
    first = deployed.model(x.cuda())
    again = deployed.model(2 * x.cuda())  # a second replay: the first output is the caller's own copy
    assert torch.allclose(first.cpu(), expected, rtol=1e-3, atol=1e-4)
    assert torch.allclose(again.cpu(), dense_output(masked_reference(pruned_run), 2 * x), rtol=1e-3, atol=1e-4)
    assert len(deployed.model.graphs) == 1


def test_the_calibration_file_is_reused_and_redone_when_the_key_differs(pruned_run):
    fast = {"repeats": 2, "budget_s": 0.0}
    first = deploy(pruned_run, batch=2, **fast)
    path = pruned_run / "calibration.json"
    assert first.calibration_path == path and not first.calibration.reused
    written, stamp = path.read_bytes(), path.stat().st_mtime_ns
    again = deploy(pruned_run, batch=2, **fast)
    assert again.calibration.reused and again.calibration.plan == first.calibration.plan
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stamp
    other_batch = deploy(pruned_run, batch=3, **fast)
    assert not other_batch.calibration.reused and other_batch.calibration.key["batch"] == 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert not deploy(pruned_run, batch=2, **fast).calibration.reused
    finally:
        torch.set_num_threads(threads)
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 3 and {e["key"]["batch"] for e in entries} == {2, 3}
    assert all(set(e["key"]) == {"device", "torch", "threads", "dtype", "batch", "input", "checkpoint"}
               for e in entries)
    assert deploy(pruned_run, batch=2, reuse=False, **fast).calibration.reused is False


def test_load_takes_a_checkpoint_file_and_keeps_its_calibration_beside_it(pruned_run, tmp_path):
    checkpoint = RunDir(pruned_run).latest()
    inside = deploy(checkpoint, batch=1, repeats=1, budget_s=0.0)
    assert inside.calibration_path == pruned_run / "calibration.json" and inside.checkpoint == checkpoint
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    alone = deploy(copy, batch=1, repeats=1, budget_s=0.0)
    assert alone.calibration_path == tmp_path / "model.calibration.json" and alone.calibration_path.is_file()


def test_load_refuses_bad_input_in_one_line(pruned_run, tmp_path):
    with pytest.raises(SparsifyError, match="is neither a checkpoint file nor a run folder") as missing:
        load(tmp_path / "nothing")
    assert "\n" not in str(missing.value)
    with pytest.raises(SparsifyError, match="batch must be at least 1"):
        load(pruned_run, batch=0)
    with pytest.raises(SparsifyError, match="unknown executor 'fast'; choose one of: blockgemm, bsr, dense"):
        load(pruned_run, executor="fast")
