"""`sparsify export`: plain files that load into the vanilla model with the pruned zeros intact; ONNX files
checked against the model with onnxruntime before they are written."""

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import invoke, tiny_yaml
from sparsify.models.build import build_model


@pytest.fixture
def pruned_run(workdir, cli):
    for command in ("download", "prune"):
        code, out, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, out + err
    return workdir


def exported(fmt, *extra):
    code, out, err = invoke("export", "-c", "tiny.yaml", "--format", fmt, *extra)
    assert code == 0, err
    return out.strip()


def check_loads_with_zeros(state):
    model = build_model("tiny_resnet", num_classes=4, in_channels=3)
    model.load_state_dict(state, strict=True)
    weight = state["layer3.0.conv2.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_safetensors_and_pth_are_plain_state_dicts(pruned_run):
    path = exported("safetensors")
    assert path.endswith("runs/tiny/export/001-r01-pruned.safetensors")
    check_loads_with_zeros(load_file(path))
    check_loads_with_zeros(torch.load(exported("pth", "-o", "model.pth"), weights_only=True))


def test_export_without_a_checkpoint_is_one_clear_line(workdir, cli):
    code, _, err = cli("export", "-c", "tiny.yaml")
    assert code == 1 and "sparsify download" in err


# ONNX: one 2:4 run exported once (with its checks) for the module; the refusals export again

@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """A tiny 2:4 run (download, prune) and its verified ONNX export: (config, file, export's stderr)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx")
    config = root / "nm.yaml"
    config.write_text(tiny_yaml(name="nm", runs_dir=str(root / "runs"), sparsity={"pattern": {"type": "nm"},
                                                                                 "step": None}))
    for command in ("download", "prune"):
        code, out, err = invoke(command, "-c", config)
        assert code == 0, out + err
    code, out, err = invoke("export", "-c", config, "--format", "onnx")
    assert code == 0, err
    return config, out.strip(), err


def checkpoints(config):
    from sparsify.io.checkpoint import load_checkpoint

    folder = config.parent / "runs" / "nm" / "checkpoints"
    return [load_checkpoint(path) for path in sorted(folder.iterdir())]  # [downloaded, pruned]


def model_of(ckpt):
    from sparsify.io.restore import rebuild

    return rebuild(ckpt).model.eval()


def masked_zeros(ckpt):
    """Element masks of the weights each layer's mask zeros."""
    from sparsify.core.patterns import build_pattern

    pattern = build_pattern(ckpt.meta["pattern"])
    return {name: (~pattern.expand(mask, tuple(ckpt.state[name].shape))).numpy() for name, mask in ckpt.masks.items()}


def test_onnx_export_says_what_it_checked(onnx_run):
    _, path, err = onnx_run
    assert path.endswith("runs/nm/export/001-r01-pruned.onnx")
    lines = err.strip().splitlines()
    matched = next(line for line in lines if line.startswith("onnx: outputs match"))
    assert "onnxruntime" in matched and "random batch 2x3x32x32 (seed 0)" in matched
    assert "tolerance atol 1e-4 + rtol 1e-3 x |PyTorch output|" in matched
    diff = float(matched.split("max abs diff ")[1].split(",")[0])
    assert 0 <= diff <= 1e-4
    assert "onnx: pruned zeros kept: 38,144 masked weights of 8 layers are exactly 0.0 in the graph" in lines
    trt = next(line for line in lines if line.startswith("onnx: TensorRT 2:4: "))
    assert trt.startswith("onnx: TensorRT 2:4: 8 of 10 conv/linear layers follow its rule")
    assert "conv1.weight (CIN 3 not a multiple of 4)" in trt and "fc.weight (64 groups with fewer than 2 zeros)" in trt


def test_onnx_file_runs_like_the_checkpoint_and_holds_its_zeros(onnx_run):
    """Checked here apart from the exporter: another batch size and seed, and the zeros layer by layer."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    config, path, _ = onnx_run
    pruned = checkpoints(config)[1]
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        expected = model_of(pruned)(batch).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    zeros = masked_zeros(pruned)
    assert len(zeros) == 8
    for name, masked in zeros.items():  # BatchNorm is folded into the convs: values scale, zeros stay
        assert graph[name].shape == masked.shape and not graph[name][masked].any()
        assert int((graph[name] == 0).sum()) == int(masked.sum()) == masked.size // 2


def test_a_graph_that_computes_something_else_is_refused(onnx_run):
    from sparsify.errors import SparsifyError
    from sparsify.io.onnx_check import FP32, Tolerance, random_batch, verify_outputs

    config, path, _ = onnx_run
    downloaded, pruned = checkpoints(config)
    data, batch = open(path, "rb").read(), random_batch(3, 32)
    assert verify_outputs(data, model_of(pruned), batch).startswith("onnx: outputs match")
    with pytest.raises(SparsifyError) as caught:  # the pruned graph against the dense model: a real mismatch
        verify_outputs(data, model_of(downloaded), batch)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("ONNX outputs differ from the model's: max abs diff ")
    assert float(message.split("max abs diff ")[1].split(",")[0]) > FP32.atol
    assert "atol 1e-4 + rtol 1e-3" in message and "nothing written" in message
    with pytest.raises(SparsifyError, match="over the tolerance atol 0 \\+ rtol 0 x"):  # rounding is not exact
        verify_outputs(data, model_of(pruned), batch, tolerance=Tolerance(0.0, 0.0))


def test_a_graph_that_lost_a_pruned_zero_is_refused(onnx_run):
    import onnx

    from sparsify.errors import SparsifyError
    from sparsify.io.onnx_check import check_zeros, graph_constants

    config, path, _ = onnx_run
    constants = graph_constants(onnx.load(path))
    zeros = masked_zeros(checkpoints(config)[1])
    name = "layer2.0.conv2.weight"
    true_zeros = zeros[name].copy()
    zeros[name][0, :, 0, 0] = True  # a mask zeroing every input channel at one (output channel, tap)
    with pytest.raises(SparsifyError, match=f"lost pruned zeros: 16 weights of {name} that its mask zeros"):
        check_zeros(constants, zeros)
    constants["val_7"] = constants.pop(name)  # renamed: found by shape and zeros instead
    zeros[name] = true_zeros
    assert check_zeros(constants, zeros).startswith("onnx: pruned zeros kept: 38,144")
    for key in [k for k, v in constants.items() if v.shape == (32, 32, 3, 3)]:
        del constants[key]
    with pytest.raises(SparsifyError, match=f"holds no constant of {name}'s shape 32x32x3x3"):
        check_zeros(constants, zeros)


def test_a_refused_onnx_export_writes_nothing(onnx_run, monkeypatch, tmp_path):
    from sparsify.io import onnx_check

    config, _, _ = onnx_run
    monkeypatch.setattr(onnx_check, "FP32", onnx_check.Tolerance(0.0, 0.0))  # tighter than fp32 rounding
    code, out, err = invoke("export", "-c", config, "--format", "onnx", "-o", tmp_path / "new" / "m.onnx")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "ONNX outputs differ from the model's: max abs diff" in err and "nothing written" in err
    assert not (tmp_path / "new").exists()


def test_onnx_export_without_onnxruntime(onnx_run, monkeypatch, tmp_path):
    config, _, _ = onnx_run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    code, _, err = invoke("export", "-c", config, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "onnxruntime, which is not installed: pip install onnxruntime" in err and "--no-verify" in err
    assert not (tmp_path / "m.onnx").exists()
    code, out, err = invoke("export", "-c", config, "--format", "onnx", "-o", tmp_path / "m.onnx", "--no-verify")
    assert code == 0 and out.strip() == str(tmp_path / "m.onnx") and (tmp_path / "m.onnx").stat().st_size > 10_000
    assert "onnx: not verified (--no-verify)" in err and "onnx: TensorRT 2:4: 8 of 10" in err


def test_a_linear_weight_held_transposed_is_found_by_shape_and_zeros():
    """convnext's Linear layers reach the graph as MatMul constants (CIN, COUT) under generated names."""
    from sparsify.errors import SparsifyError
    from sparsify.io.onnx_check import check_zeros

    weight = np.arange(1.0, 97.0, dtype=np.float32).reshape(8, 12)
    zeros = np.zeros((8, 12), dtype=bool)
    zeros[:, ::2] = True
    weight[zeros] = 0.0
    other = np.ones((12, 8), dtype=np.float32)  # same transposed shape, no zeros: not taken for it
    assert check_zeros({"val_1": other, "val_5": weight.T.copy()}, {"fc.weight": zeros}).startswith(
        "onnx: pruned zeros kept: 48 masked weights of 1 layers")
    with pytest.raises(SparsifyError, match="lost pruned zeros: 48 weights of fc.weight"):
        check_zeros({"val_1": other}, {"fc.weight": zeros})
