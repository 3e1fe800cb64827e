"""Compaction (`export --compact`): unused channels removed, their constants folded, outputs unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from sparsify.core.channel import ChannelPattern
from sparsify.core.masks import MaskEnforcer
from sparsify.graph.compact import compact_model, shrink_to_


class Chain(nn.Module):
    """conv(3x3) -> BN -> ReLU -> conv `consumer` -> pooled logits; `padding` is the consumer's."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.consumer = nn.Conv2d(4, 3, 3 if padding else 1, padding=padding, bias=False)

    def forward(self, x):
        return self.consumer(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


def chain(padding: int, shift: float) -> Chain:
    """Output channel 1 of `conv` zero; BN 1's running mean 0, var 1, scale 2, shift `shift`."""
    torch.manual_seed(0)
    model = Chain(padding).eval()
    with torch.no_grad():
        model.conv.weight[1] = 0
        model.bn.bias.fill_(0.5)
        model.bn.bias[1] = shift
        model.bn.weight.fill_(2.0)
    return model


def example(size: int = 8) -> torch.Tensor:
    return torch.randn(2, 2, size, size, generator=torch.Generator().manual_seed(1))


def test_a_zero_channel_constant_folds_into_a_1x1_consumers_bias():
    """relu(shift) = 0.75 reaches a 1x1 conv: its bias becomes 0.75 * the channel's input weights."""
    model = chain(padding=0, shift=0.75)
    result = compact_model(model, example())
    compact = result.model
    assert compact.conv.weight.shape == (3, 2, 3, 3) and compact.bn.num_features == 3
    assert compact.consumer.weight.shape == (3, 3, 1, 1) and compact.consumer.in_channels == 3
    assert torch.allclose(compact.consumer.bias, 0.75 * model.consumer.weight[:, 1, 0, 0])
    assert result.shapes["consumer.bias"] == [3] and result.sets[0].folded == 1
    assert torch.allclose(compact(example(5)), model(example(5)), atol=1e-6)
    assert model.conv.weight.shape[0] == 4  # the masked model is left alone


def test_a_padded_consumer_keeps_a_nonzero_constant_and_removes_a_zero_one():
    kept = compact_model(chain(padding=1, shift=0.75), example())
    assert kept.removed == 0 and kept.sets[0].kept_zero == 1 and "padding of consumer" in kept.sets[0].reason
    gone = compact_model(chain(padding=1, shift=-0.3), example())  # relu clips the constant to exactly 0
    assert gone.removed == 1 and gone.sets[0].folded == 0 and gone.model.consumer.bias is None
    assert gone.model.consumer.weight.shape == (3, 3, 3, 3)


def test_a_layer_keeps_at_least_one_channel():
    model = chain(padding=0, shift=0.0)
    with torch.no_grad():
        model.conv.weight.zero_()
    result = compact_model(model, example())
    assert result.model.conv.weight.shape[0] == 1 and "at least one channel" in result.sets[0].reason


def test_shrink_to_gives_a_fresh_model_the_compact_shapes():
    result = compact_model(chain(padding=0, shift=0.75), example())
    fresh = Chain(0)
    shrink_to_(fresh, result.shapes)
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    fresh.eval()
    assert torch.equal(fresh(example()), result.model(example()))


def channel_pruned(model: nn.Module, example: torch.Tensor, share: float = 0.5) -> nn.Module:
    """Every dense conv/Linear but the last loses its first `share` output channels, as pattern channel
    leaves them (weights and the BatchNorm after them zero); BatchNorm statistics made non-trivial."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
             and getattr(m, "groups", 1) == 1][:-1]
    params = dict(model.named_parameters())
    masks = {}
    for name in names:
        weight = params[f"{name}.weight"]
        mask = torch.ones(weight.shape[0], 1, dtype=torch.bool)
        mask[: int(weight.shape[0] * share)] = False
        masks[f"{name}.weight"] = mask
    MaskEnforcer(model, masks, ChannelPattern()).apply_()
    return model.eval()


@pytest.mark.parametrize("arch, share_left", [("resnet18", 0.3), ("resnet50", 0.3), ("mobilenet_v2", 0.5),
                                              ("convnext_tiny", 0.6), ("densenet121", 0.9)])
def test_torchvision_models_compact_with_equal_outputs(arch, share_left):
    """Bottlenecks and downsample shortcuts, depthwise inverted residuals, LayerNorm and layer scale
    (whose residual stream stays), concat (whose channels stay): outputs equal within 1e-4."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = channel_pruned(getattr(torchvision.models, arch)(num_classes=10), x)
    before = sum(p.numel() for p in model.parameters())
    result = compact_model(model, x)  # raises when outputs differ
    after = sum(p.numel() for p in result.model.parameters())
    assert result.removed > 0 and after < share_left * before * 2
    for plan in result.sets:
        assert not plan.kept_zero or plan.reason  # every zero channel left in place says why
    with torch.no_grad():
        y = torch.randn(3, 3, 40, 40)
        assert torch.allclose(result.model(y), model(y), rtol=1e-4, atol=1e-4 * float(model(y).abs().max()))


def test_export_compact_writes_three_loadable_formats(tiny_config, cli, tmp_path):
    """Pattern channel on tiny_resnet, then export --compact: safetensors (load_compact), pt2
    (torch.export.load) and ONNX (onnxruntime) compute what the masked checkpoint computes."""
    pytest.importorskip("onnxscript")
    import onnxruntime

    from sparsify.io.checkpoint import load_checkpoint
    from sparsify.io.restore import rebuild
    from sparsify.runtime import load_compact

    config = tiny_config(sparsity={"target": 0.5, "step": 0.5, "pattern": {"type": "channel"}})
    assert cli("download", "-c", config)[0] == 0 and cli("prune", "-c", config)[0] == 0
    paths = {}
    for fmt in ("safetensors", "pt2", "onnx"):
        code, out, err = cli("export", "-c", config, "--compact", "-f", fmt)
        assert code == 0, err
        paths[fmt] = out.strip().splitlines()[-1]
        assert paths[fmt].endswith(f".compact.{fmt}") and "channels removed" in err
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    masked = rebuild(load_checkpoint(latest)).model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = masked(x)
        compact = load_compact(paths["safetensors"])
        assert sum(p.numel() for p in compact.parameters()) < 0.5 * sum(p.numel() for p in masked.parameters())
        assert torch.allclose(compact(x), want, atol=1e-4)
        assert torch.allclose(torch.export.load(paths["pt2"]).module()(x), want, atol=1e-4)
    session = onnxruntime.InferenceSession(paths["onnx"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)
    from safetensors import safe_open

    with safe_open(paths["safetensors"], framework="pt") as handle:
        plans = json.loads(handle.metadata()["compaction"])
    assert sum(p["removed"] for p in plans) > 0


def test_export_compact_refuses_pth_and_a_plain_file_to_load_compact(tiny_config, cli, tmp_path):
    from sparsify.errors import SparsifyError
    from sparsify.runtime import load_compact

    config = tiny_config()
    assert cli("download", "-c", config)[0] == 0
    code, out, err = cli("export", "-c", config, "--compact", "-f", "pth")
    assert code == 1 and err.count("\n") == 1 and "--format onnx, pt2, safetensors" in err
    assert not (tmp_path / "runs/tiny/export").exists()
    code, out, _ = cli("export", "-c", config)
    with pytest.raises(SparsifyError, match="no compact_shapes"):
        load_compact(out.strip().splitlines()[-1])


def test_bench_times_the_compact_model_and_report_shows_the_compaction(tiny_config, cli, tmp_path):
    config = tiny_config(sparsity={"target": 0.5, "step": 0.5, "pattern": {"type": "channel"}})
    assert cli("download", "-c", config)[0] == 0 and cli("prune", "-c", config)[0] == 0
    code, out, err = cli("bench", "-c", config, "--batch", "2", "--runs", "1", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert [row["model"] for row in result["end_to_end"]] == ["dense", "masked", "calibrated", "compact"]
    compaction = result["compaction"]
    assert compaction["removed_channels"] > 0 and compaction["macs_after"] < 0.5 * compaction["macs_before"]
    assert all(row["params_after"] < row["params_before"] for row in compaction["layers"])
    code, out, err = cli("report", "-c", config)
    assert code == 0, err
    assert "compaction (export --compact)" in out and "layer1.0.conv1" in out
    assert f"{compaction['removed_channels']} channels removed" in out.replace("\n", " ")


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  pytest.param("convnext_tiny", marks=pytest.mark.slow),
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_pattern_channel_through_the_pipeline_compacts_torchvision_models(arch, tmp_path):
    """download -> prune (pattern channel, 40% per layer, l1) -> export --compact: the compact model computes
    what the pruned checkpoint computes, and is smaller."""
    from sparsify.config import load_config
    from sparsify.io.checkpoint import load_checkpoint
    from sparsify.io.export import export_checkpoint
    from sparsify.io.restore import rebuild
    from sparsify.io.rundir import RunDir
    from sparsify.runtime import load_compact
    from sparsify.stages import download, prune

    config = load_config(None, [f"name={arch}", f"runs_dir={tmp_path}", "device=cpu", f"model.arch={arch}",
                                "model.weights=null", "model.num_classes=10", "model.input_size=32",
                                "data.dataset=fake", "data.fake_samples=4", "data.batch_size=2",
                                'sparsity.pattern={"type": "channel"}', "sparsity.criterion=l1", "sparsity.step=1.0",
                                "sparsity.target=0.4", "sparsity.recalibrate_bn=0",  # statistics of 4 fake images: ill-conditioned
                                f"sparsity.include_linear={arch == 'convnext_tiny'}"])  # its MLPs are Linear
    download(config)
    prune(config)
    run = RunDir(config.run_dir)
    path = export_checkpoint(run, fmt="safetensors", compact=True)
    masked = rebuild(load_checkpoint(run.latest())).model.eval()
    compact = load_compact(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = masked(x)
        assert torch.allclose(compact(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert sum(p.numel() for p in compact.parameters()) < 0.8 * sum(p.numel() for p in masked.parameters())


def test_an_ill_conditioned_float32_model_is_judged_again_in_float64():
    """8192x - (1 - 2^-13) * 8192x = x exactly, but float32 rounds the large terms: past 1e-4 of the
    output. In float64 the one-layer equivalent is exact, so the check passes; a real change still fails."""
    from sparsify.graph.compact import TOLERANCE, check_outputs, relative_error

    masked = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False))
    compact = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        masked[0].weight.fill_(8192.0)
        masked[1].weight.copy_(torch.tensor([[1.0, -(1 - 2.0 ** -13)]]))
        compact.weight.fill_(1.0)
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    assert relative_error(masked, compact, x) > TOLERANCE  # float32 alone would refuse it
    check_outputs(masked, compact, x)
    with torch.no_grad():
        compact.weight.fill_(1.001)
    with pytest.raises(ValueError, match="float64"):
        check_outputs(masked, compact, x)


class InputResidual(nn.Module):
    """x + conv(x): the conv's channels join the model input's, which compaction cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 2, 1), nn.Linear(2, 3)

    def forward(self, x):
        return self.head((x + self.conv(x)).mean((2, 3)))


def test_a_set_joined_to_the_model_input_is_kept_with_its_reason():
    model = InputResidual().eval()
    with torch.no_grad():
        model.conv.weight[1] = 0
    result = compact_model(model, example())
    assert result.removed == 0 and result.sets[0].kept_zero == 1 and "model input" in result.sets[0].reason


class TokensMlp(nn.Module):
    """A reshape the channel graph does not follow, then an MLP over the last axis (as in a vision transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], -1, 8)
        return self.head((tokens + self.fc2(torch.nn.functional.gelu(self.fc1(tokens)))).mean(1))


def test_an_mlp_after_an_op_the_graph_loses_still_compacts():
    model = TokensMlp().eval()
    with torch.no_grad():
        model.fc1.weight[:3] = 0
        model.fc1.bias[:3] = 0
    result = compact_model(model, example(size=4))
    assert result.removed == 3 and result.model.fc1.out_features == 3 and result.model.fc2.in_features == 3
