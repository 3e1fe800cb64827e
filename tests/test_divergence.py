"""Diverged training fails loudly and leaves the run usable; non-finite numbers never reach a checkpoint."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from sparsify.io.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from sparsify.io.rundir import RunDir
from sparsify.cli import app
from sparsify.errors import CheckpointError, TrainingDiverged
from sparsify.training.log import read_rows
from sparsify.training.stage import check_finite

EXPLODING = textwrap.dedent(
    """\
    name: boom
    seed: 0
    device: cpu
    model: {arch: "factory_model:build_exploding", num_classes: 4}
    data: {dataset: fake, fake_samples: 32, batch_size: 8}
    sparsity: {target: 0.5, step: 0.5, pattern: {type: unstructured}, criterion: l1}
    train: {lr: 1.0, log_every: 1}
    """
)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom.yaml").write_text(EXPLODING)
    return tmp_path


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def checkpoints(root):
    return [p.name for p in RunDir(root / "runs/boom").checkpoints()]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e308"])
def test_the_config_refuses_an_lr_no_optimizer_can_use(run, value):
    code, _, err = invoke("download", "-c", "boom.yaml", "--set", f"train.lr={value}")
    assert code == 1 and "train.lr" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (run / "runs").exists()


@pytest.mark.parametrize("key", ["sparsity.target", "train.weight_decay", "data.mixup_alpha", "train.warmup_epochs"])
def test_the_config_refuses_every_non_finite_number(run, key):
    code, _, err = invoke("download", "-c", "boom.yaml", "--set", f"{key}=.nan")
    assert code == 1 and key in err and "finite" in err


def test_diverged_training_exits_1_naming_the_step_and_the_run_stays_usable(run):
    assert invoke("download", "-c", "boom.yaml")[0] == 0
    code, out, err = invoke("train", "-c", "boom.yaml")
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "training diverged in round 0, epoch 1, step 2: the training loss is nan" in line
    assert "000-r00-pretrained.safetensors" in line and "train.lr" in line
    assert checkpoints(run) == ["000-r00-pretrained.safetensors"]
    assert not (run / "runs/boom/train-state.safetensors").exists()
    history = (run / "runs/boom/history.jsonl").read_text().splitlines()
    assert [json.loads(h)["stage"] for h in history] == ["pretrained"]
    # the run goes on: a sane lr trains, prune and eval read what it wrote
    code, out, err = invoke("train", "-c", "boom.yaml", "--set", "train.lr=1e-30")
    assert code == 0, err
    assert invoke("prune", "-c", "boom.yaml", "--set", "train.lr=1e-30")[0] == 0
    assert invoke("eval", "-c", "boom.yaml", "--set", "train.lr=1e-30")[0] == 0
    rows = read_rows(run / "runs/boom/metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # only the successful stage's rows remain
    assert all(float(r["loss"]) > 0 for r in rows)


def test_fp16_stops_only_once_the_scaler_gave_up(run):
    assert invoke("download", "-c", "boom.yaml", "--set", "data.batch_size=1")[0] == 0
    code, _, err = invoke("train", "-c", "boom.yaml", "--set", "data.batch_size=1", "--set", "train.amp=fp16")
    assert code == 1
    assert "fp16 gradients overflow even at loss scale 1" in err
    step = int(err.split(", step ")[1].split(":")[0])
    assert step == 17  # fp16 overflows from the first step: steps 1..16 were skipped while the scale fell
    # from 65536 to 1, and step 17 overflowed at scale 1
    rows = read_rows(run / "runs/boom/metrics.csv")
    assert all(r["loss"] == "" or 0 < float(r["loss"]) < float("inf") for r in rows)
    assert checkpoints(run) == ["000-r00-pretrained.safetensors"]


def faulty_copy(path, tmp_path):
    """A copy of checkpoint `path` with NaN in one weight, as a faulty older version could write it."""
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("model.") and k.endswith("weight"))
    tensors[key][0] = float("nan")
    meta = read_metadata(path)
    out = tmp_path / path.name
    save_file(tensors, out, metadata=meta)
    return out, key


def test_the_loader_and_every_stage_refuse_a_checkpoint_with_nan(run, tmp_path):
    assert invoke("download", "-c", "boom.yaml")[0] == 0
    latest = run / "runs/boom/checkpoints/000-r00-pretrained.safetensors"
    bad, key = faulty_copy(latest, tmp_path)
    with pytest.raises(CheckpointError, match=f"NaN or inf in {key[6:]}: the training that wrote it diverged"):
        load_checkpoint(bad)
    bad.replace(latest)
    (run / "runs/boom/history.jsonl").unlink()  # no recorded sha256: the NaN check, not the hash, refuses it
    for command in (["prune"], ["eval"], ["train"], ["export", "--format", "safetensors"]):
        code, _, err = invoke(*command, "-c", "boom.yaml")
        assert code == 1 and "diverged" in err and "Delete this file" in err, (command, err)


def test_save_checkpoint_never_writes_what_the_loader_refuses(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].running_var.fill_(float("inf"))
    with pytest.raises(CheckpointError, match=r"refusing to write c.safetensors: NaN or inf in model.1.running_var"):
        save_checkpoint(tmp_path / "c.safetensors", model.state_dict(), {}, {"arch": "x"})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_batchnorm_statistics_stop_the_stage():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    check_finite(model, torch.device("cpu"), where="after 1 epoch(s)")
    model[1].running_mean[1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"after 1 epoch\(s\): NaN or inf in 1.running_mean"):
        check_finite(model, torch.device("cpu"), where="after 1 epoch(s)")


def test_a_nan_validation_loss_with_finite_weights_stops_the_stage(run):
    config = EXPLODING.replace("build_exploding", "build_overflowing_in_eval").replace("lr: 1.0", "lr: 0.01")
    (run / "boom.yaml").write_text(config)
    assert invoke("download", "-c", "boom.yaml")[0] == 0
    code, _, err = invoke("train", "-c", "boom.yaml")
    assert code == 1 and "Traceback" not in err
    assert "the validation loss is nan although every weight is finite" in err.strip().splitlines()[-1]
    assert checkpoints(run) == ["000-r00-pretrained.safetensors"]
