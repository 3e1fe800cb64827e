"""`sparsify check` on what `prune` writes (block and nm), on hand-altered files and on plain state dicts."""

import json
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from sparsify.core.channel import ChannelPattern
from sparsify.io.checkpoint import parse_checkpoint
from sparsify.io.restore import build_model_for
from sparsify.report.check import check_file
from sparsify.cli import app

CONFIG = textwrap.dedent(
    """\
    name: {name}
    seed: 0
    device: cpu
    model: {{arch: tiny_resnet, num_classes: 4}}
    data: {{dataset: fake, fake_samples: 16, batch_size: 16}}
    sparsity: {sparsity}
    """
)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def pruned_checkpoint(tmp_path, monkeypatch, name, sparsity):
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{name}.yaml").write_text(CONFIG.format(name=name, sparsity=sparsity))
    assert invoke("download", "-c", f"{name}.yaml")[0] == 0
    code, out, err = invoke("prune", "-c", f"{name}.yaml")
    assert code == 0, out + err
    return sorted((tmp_path / "runs" / name / "checkpoints").iterdir())[-1]


def resave_with_a_masked_weight_set(path, out):
    """Copy a checkpoint, set one masked-out weight to 0.5, keep its metadata."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k[5:] for k, m in tensors.items() if k.startswith("mask.") and not m.all())
    mask = tensors[f"mask.{name}"]
    weight = tensors[f"model.{name}"]
    if mask.shape != weight.shape:  # block masks: expand to one element of the first pruned block
        r, c = (~mask).nonzero()[0].tolist()
        weight[r * 8, c * 8].view(-1)[0] = 0.5
    else:
        weight[~mask] = torch.where(torch.arange(int((~mask).sum())) == 0, 0.5, 0.0)
    save_file(tensors, str(out), metadata=meta)
    return name


@pytest.mark.parametrize("name, sparsity", [
    ("blk", "{pattern: {type: block, block: [8, 8]}, target: 0.5, step: 0.5}"),
    ("nm", "{pattern: {type: nm, n: 2, m: 4}}"),
    ("nmp", "{pattern: {type: nm}, permute: {enabled: true, max_iterations: 100}}"),
])
def test_check_passes_on_prune_output_and_catches_a_hand_altered_file(tmp_path, monkeypatch, name, sparsity):
    path = pruned_checkpoint(tmp_path, monkeypatch, name, sparsity)
    code, out, err = invoke("check", path)
    assert code == 0, out + err
    assert "follows" in out.splitlines()[-1] and "0 violating" in out
    result = json.loads(invoke("check", path, "--format", "json")[1])
    assert result["follows"] and result["checked"] >= 2 and result["kind"] == "checkpoint"
    assert all(layer["sparsity"] >= (0.25 if name == "blk" else 0.5) for layer in result["layers"])
    if name == "nmp":  # permuted, then pruned: the record is in the checkpoint and the report
        code, out, _ = invoke("report", path.parent.parent, "--format", "json")
        record = json.loads(out)["permutation"]
        assert code == 0 and record["eligible"] == 8 and set(record["layers"]) == {r["parameter"] for r in
                                                                                  result["layers"]}
        assert "layers permuted" in invoke("report", path.parent.parent)[1]
    if name.startswith("nm"):
        assert result["target"] == 0.5 and result["sparsity"] == 0.5
        assert invoke("check", path, "--pattern", "1:4")[0] == 1  # 2 of 4 kept is not 1:4
    altered = tmp_path / "altered.safetensors"
    layer = resave_with_a_masked_weight_set(path, altered)
    code, out, err = invoke("check", altered)
    assert code == 1
    assert f"{layer} does not follow" in err and "masked weights are not 0.0" in err
    assert "VIOLATES" in out


def dense_state():
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(16, 32, 3, 3), "stem.weight": torch.randn(16, 3, 3, 3),
            "bn.weight": torch.ones(16), "fc.weight": torch.randn(8, 16)}


def two_of_four(w):
    """Zero the 2 smallest |w| of every 4 input channels."""
    groups = w.movedim(1, -1).reshape(*w.movedim(1, -1).shape[:-1], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(w.movedim(1, -1).shape).movedim(-1, 1).contiguous()


def test_plain_state_dicts_are_checked_by_shape(tmp_path):
    state = dense_state()
    state["conv.weight"], state["fc.weight"] = two_of_four(state["conv.weight"]), two_of_four(state["fc.weight"])
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    result = check_file(good, pattern="2:4")
    assert result["follows"] and result["kind"] == "state dict"
    hub_style = tmp_path / "hub.safetensors"  # other tools write {"format": "pt"}: still a plain state dict
    save_file(state, str(hub_style), metadata={"format": "pt"})
    assert check_file(hub_style, pattern="2:4")["kind"] == "state dict"
    assert [layer["parameter"] for layer in result["layers"]] == ["conv.weight", "fc.weight"]
    assert [s["parameter"] for s in result["skipped"]] == ["stem.weight"]
    state["conv.weight"][3, 4:8, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 nonzeros in one group
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, bad)
    code, out, err = invoke("check", bad, "--pattern", "2:4")
    assert code == 1 and "conv.weight does not follow 2:4: 1 groups of 4 input channels" in err
    code, out, err = invoke("check", bad, "--pattern", "8x8")
    assert code == 0 and "conv.weight" in out


def test_a_file_without_masks_needs_a_pattern_and_nothing_to_check_fails(tmp_path):
    path = tmp_path / "stem.safetensors"
    save_file({"stem.weight": torch.randn(16, 3, 3, 3)}, str(path))
    code, _, err = invoke("check", path)
    assert code == 1 and "pass --pattern" in err
    code, _, err = invoke("check", path, "--pattern", "2:4")
    assert code == 1 and "no weight that pattern 2:4 applies to" in err
    code, _, err = invoke("check", path, "--pattern", "2:4:8")
    assert code == 1 and "N:M" in err


def test_tensorrt_rule_on_hand_made_weights():
    from sparsify.core.tensorrt import tensorrt_2to4

    good = torch.tensor([[[1.0, 0, 2, 0, 0, 0, 0, 3]]]).movedim(-1, 1)  # (1, 8, 1): two groups, 2 and 3 zeros
    assert tensorrt_2to4(good) == "yes"
    assert tensorrt_2to4(torch.zeros(8, 16)) == "yes"
    one_zero = good.clone()
    one_zero[0, 1, 0] = 5.0  # the first group keeps 3 of 4
    assert tensorrt_2to4(one_zero) == "no: 1 groups with fewer than 2 zeros"
    assert tensorrt_2to4(torch.zeros(8, 6, 3, 3)) == "no: CIN 6 not a multiple of 4"
    assert tensorrt_2to4(torch.randn(8, 16, 3, 3)) == "no: 288 groups with fewer than 2 zeros"  # 8 x 9 taps x 4


def test_check_2to4_says_per_layer_whether_tensorrt_can_run_it(tmp_path):
    torch.manual_seed(0)
    state = {"good.weight": two_of_four(torch.randn(16, 16, 3, 3)),
             "six.weight": two_of_four(torch.randn(8, 8, 3, 3))[:, :6].contiguous(),  # CIN 6: skipped by 2:4
             "one.weight": two_of_four(torch.randn(16, 16, 3, 3)),
             "fc.weight": two_of_four(torch.randn(8, 16))}
    state["one.weight"][5, 8:12, 2, 0] = torch.tensor([1.0, 2.0, 0.0, 4.0])  # one group with a single zero
    path = tmp_path / "sd.safetensors"
    save_file(state, str(path))
    code, out, err = invoke("check", path, "--pattern", "2:4", "--format", "json")
    result = json.loads(out)
    verdicts = {e["parameter"]: e["tensorrt"] for e in result["layers"] + result["skipped"]}
    assert verdicts == {"good.weight": "yes", "fc.weight": "yes", "six.weight": "no: CIN 6 not a multiple of 4",
                        "one.weight": "no: 1 groups with fewer than 2 zeros"}
    assert result["tensorrt"]["layers"] == 4 and result["tensorrt"]["accelerable"] == 2
    assert code == 1 and "one.weight does not follow 2:4" in err  # 3 nonzeros break 2:4 itself too
    lines = invoke("check", path, "--pattern", "2:4")[1].splitlines()
    assert any(line.startswith("  good.weight [16x16x3x3]") and line.endswith("ok; tensorrt 2:4: yes") for line in lines)
    assert "  six.weight: not checked (needs COUT % 8 == 0 and CIN % 16 == 0 for 2:4 (has 8x6)); " \
           "tensorrt 2:4: no: CIN 6 not a multiple of 4" in lines
    assert any(line.startswith("  one.weight") and line.endswith("tensorrt 2:4: no: 1 groups with fewer than 2 zeros")
               for line in lines)
    assert lines[-2].startswith("tensorrt 2:4: 2 of 4 conv/Linear layers follow TensorRT's rule")
    unpruned = invoke("check", path, "--pattern", "8x8", "--format", "json")[1]
    assert "tensorrt" not in unpruned  # the column belongs to 2:4 only


def test_check_of_a_channel_checkpoint_also_checks_the_bias_and_batchnorm_of_pruned_channels(tmp_path, monkeypatch):
    path = pruned_checkpoint(tmp_path, monkeypatch, "chan", "{pattern: {type: channel}, target: 0.5, step: 0.5}")
    result = json.loads(invoke("check", path, "--format", "json")[1])
    assert result["follows"] and result["followers"]["checked"] >= 2, result.get("followers")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layer = next(k[5:] for k, m in tensors.items() if k.startswith("mask.") and not m.all())
    model = build_model_for(parse_checkpoint(path).meta)
    own_bias = layer.removesuffix("weight") + "bias"
    shift = next(p for p in ChannelPattern().followers(model, [layer]) if p.endswith(".bias") and p != own_bias)
    bn = f"model.{shift}"  # the shift of the BatchNorm right after the pruned conv
    assert tensors[bn][~tensors[f"mask.{layer}"].reshape(-1)].eq(0).all()  # what prune wrote: zero
    tensors[bn][(~tensors[f"mask.{layer}"].reshape(-1)).nonzero()[0]] = 0.25
    altered = tmp_path / "altered.safetensors"
    save_file(tensors, str(altered), metadata=meta)
    code, out, err = invoke("check", altered)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{layer} does not follow" in err and f"1 pruned output channels have a nonzero {bn[6:]}" in err
