"""The CLI end to end on a tiny model: in-process through CliRunner, and once as a shell loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import invoke, tiny_yaml

SCHEDULE = {"schedule": {"dense_epochs": 1, "epochs_per_round": 1, "final_epochs": 1}}


@pytest.fixture
def tiny_sections():
    return SCHEDULE


def checkpoints(workdir):
    return sorted(p.name for p in (workdir / "runs/tiny/checkpoints").iterdir())


def test_stages_write_checkpoints_and_history(workdir):
    assert invoke("download", "-c", "tiny.yaml")[0] == 0
    code, out, _ = invoke("prune", "-c", "tiny.yaml")
    assert code == 0 and "round 1" in out
    code, out, _ = invoke("train", "-c", "tiny.yaml", "--epochs", "1")
    assert code == 0 and "val top-1" in out
    code, out, _ = invoke("prune", "-c", "tiny.yaml")
    assert code == 3 and "target" in out + _
    assert checkpoints(workdir) == ["000-r00-pretrained.safetensors", "001-r01-pruned.safetensors",
                                    "002-r01-trained.safetensors"]
    history = [json.loads(line) for line in (workdir / "runs/tiny/history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["pretrained", "pruned", "trained"]
    assert history[1]["sparsity"] == pytest.approx(0.5)
    assert (workdir / "runs/tiny/config.yaml").is_file()
    code, out, _ = invoke("eval", "-c", "tiny.yaml")
    assert code == 0 and "val top-1" in out
    code, out, _ = invoke("report", "-c", "tiny.yaml", "--format", "json")
    report = json.loads(out)
    assert report["summary"]["layers pruned"] == "8/8"
    assert [h["stage"] for h in report["history"]] == ["pretrained", "pruned", "trained", "eval"]
    for fmt in ("table", "csv", "markdown"):
        code, out, _ = invoke("report", "runs/tiny/checkpoints/002-r01-trained.safetensors", "-f", fmt)
        assert code == 0 and "layer3.0.conv2.weight" in out


def test_download_refuses_to_overwrite_without_force(workdir):
    assert invoke("download", "-c", "tiny.yaml")[0] == 0
    assert invoke("prune", "-c", "tiny.yaml")[0] == 0
    code, _, err = invoke("download", "-c", "tiny.yaml")
    assert code == 1 and "--force" in err
    assert len(checkpoints(workdir)) == 2
    assert invoke("download", "-c", "tiny.yaml", "--force")[0] == 0
    assert checkpoints(workdir) == ["000-r00-pretrained.safetensors"]


def test_bad_input_is_one_line_exit_1_and_writes_nothing(workdir):
    code, out, err = invoke("download", "-c", "tiny.yaml", "--set", "train.lrr=1")
    assert code == 1 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unknown config key 'train.lrr'" in err
    assert not (workdir / "runs/tiny").exists()
    code, _, err = invoke("prune", "-c", "tiny.yaml")
    assert code == 1 and "sparsify download" in err
    assert not (workdir / "runs").exists()
    code, _, err = invoke("download", "-c", "missing.yaml")
    assert code == 1 and "missing.yaml" in err


def test_pattern_change_inside_a_run_is_refused(workdir):
    invoke("download", "-c", "tiny.yaml")
    invoke("prune", "-c", "tiny.yaml")
    code, _, err = invoke("prune", "-c", "tiny.yaml", "--set", "sparsity.pattern.block=[4,4]")
    assert code == 1 and "block 8x8" in err and "block 4x4" in err


def test_altered_checkpoint_is_refused(workdir):
    invoke("download", "-c", "tiny.yaml")
    invoke("prune", "-c", "tiny.yaml")
    path = workdir / "runs/tiny/checkpoints/001-r01-pruned.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    mask = tensors["mask.layer3.0.conv2.weight"]
    weight = tensors["model.layer3.0.conv2.weight"]
    row, col = [int(i) for i in (~mask).nonzero()[0]]
    weight[row * 8, col * 8, 0, 0] = 1.0  # revive one pruned weight
    save_file(tensors, path, metadata=meta)
    code, _, err = invoke("train", "-c", "tiny.yaml")
    assert code == 1 and "was altered" in err
    code, _, err = invoke("report", str(path.relative_to(workdir)), "-f", "json")
    assert code == 1 and "altered" in err
    copy = workdir / "loose.safetensors"  # outside a run there is no history, the drift guard catches it
    copy.write_bytes(path.read_bytes())
    code, _, err = invoke("report", "loose.safetensors")
    assert code == 1 and "nonzero weights inside pruned groups of layer3.0.conv2.weight" in err


def test_run_is_resumable_from_the_last_finished_stage(workdir):
    invoke("download", "-c", "tiny.yaml")
    invoke("train", "-c", "tiny.yaml")  # as if `run` had crashed after its dense epoch
    code, _, err = invoke("run", "-c", "tiny.yaml")
    assert code == 0, err
    assert checkpoints(workdir) == ["000-r00-pretrained.safetensors", "001-r00-trained.safetensors",
                                    "002-r01-pruned.safetensors", "003-r01-trained.safetensors",
                                    "004-r01-final.safetensors"]
    code, _, _ = invoke("run", "-c", "tiny.yaml")
    assert code == 0 and len(checkpoints(workdir)) == 5


def test_shell_loop_as_real_processes(tmp_path):
    (tmp_path / "tiny.yaml").write_text(tiny_yaml(sparsity={"step": 0.2}, **SCHEDULE))
    bin_dir = Path(sys.executable).parent
    script = (
        "set -e; sparsify download -c tiny.yaml\n"
        "while sparsify prune -c tiny.yaml; do sparsify train -c tiny.yaml --epochs 1; done\n"
        "set +e; sparsify prune -c tiny.yaml; code=$?; set -e\n"
        "test $code -eq 3 || { echo \"prune exited $code at the target, not 3\"; exit 9; }\n"
        "sparsify report -c tiny.yaml --format json > report.json\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    stages = [h["stage"] for h in report["history"]]
    assert stages == ["pretrained"] + ["pruned", "trained"] * 3  # the 64x64 conv: 13, 24, 32 of 64 blocks
    assert report["summary"]["sparsity of eligible weights"] == pytest.approx(0.5)
    assert "Traceback" not in done.stderr


def test_same_config_and_seed_give_the_same_masks_and_weights(workdir):
    for name in ("a", "b"):
        for command in (["download"], ["train"], ["prune"], ["train"]):
            code, _, err = invoke(*command, "-c", "tiny.yaml", "--set", f"name={name}")
            assert code == 0, err
    a = load_file(workdir / "runs/a/checkpoints/003-r01-trained.safetensors")
    b = load_file(workdir / "runs/b/checkpoints/003-r01-trained.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
