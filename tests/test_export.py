"""`sparsify export`: plain files that load into the vanilla model with the pruned zeros intact."""

import textwrap

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.models.build import build_model

CONFIG = textwrap.dedent(
    """\
    name: ex
    device: cpu
    model: {arch: tiny_resnet, num_classes: 4}
    data: {dataset: fake, fake_samples: 8, batch_size: 8}
    sparsity: {target: 0.5, step: 0.5}
    """
)


@pytest.fixture
def pruned_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ex.yaml").write_text(CONFIG)
    for command in ("download", "prune"):
        assert CliRunner().invoke(app, [command, "-c", "ex.yaml"]).exit_code == 0
    return tmp_path


def exported(fmt, *extra):
    result = CliRunner().invoke(app, ["export", "-c", "ex.yaml", "--format", fmt, *extra])
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def check_loads_with_zeros(state):
    model = build_model("tiny_resnet", num_classes=4, in_channels=3)
    model.load_state_dict(state, strict=True)
    weight = state["layer3.0.conv2.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_safetensors_and_pth_are_plain_state_dicts(pruned_run):
    path = exported("safetensors")
    assert path.endswith("runs/ex/export/001-r01-pruned.safetensors")
    check_loads_with_zeros(load_file(path))
    check_loads_with_zeros(torch.load(exported("pth", "-o", "model.pth"), weights_only=True))


def test_onnx_graph_carries_the_zeros(pruned_run):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    graph = onnx.load(exported("onnx")).graph
    from onnx import numpy_helper

    arrays = [numpy_helper.to_array(t) for t in graph.initializer]
    assert any(a.size == 64 * 64 * 9 and (a == 0).mean() == 0.5 for a in arrays)


def test_export_without_a_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ex.yaml").write_text(CONFIG)
    result = CliRunner().invoke(app, ["export", "-c", "ex.yaml"])
    assert result.exit_code == 1 and "sparsify download" in result.stderr
