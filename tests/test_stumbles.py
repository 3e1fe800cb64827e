"""What a new user runs into first: the report's width, units and outcome line, `check` on a dense
checkpoint, data settings refused at download, a failing train that changes nothing, file modes,
the help text, --version, and running without a config."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import invoke

@pytest.fixture
def tiny_sections():
    return {"train": {"lr": 0.01, "log_every": 1}}


def ok(*args):
    code, out, err = invoke(*args)
    assert code == 0, err
    return out


def run_dir(workdir):
    return workdir / "runs/tiny"


# ---------------------------------------------------------------- report


def dense_then_pruned(workdir):
    """download, one dense epoch, one prune round to the target, one epoch: round 1 at 50%."""
    for command in (["download"], ["train"], ["prune"], ["train"]):
        ok(*command, "-c", "tiny.yaml")


def test_report_fits_80_columns_in_one_unit_and_ends_with_the_outcome(workdir):
    dense_then_pruned(workdir)
    history = [json.loads(line) for line in (run_dir(workdir) / "history.jsonl").read_text().splitlines()]
    dense, final = history[1]["metrics"]["val_acc1"], history[3]["metrics"]["val_acc1"]
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "sparsify", "report", "-c", "tiny.yaml"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert lines[-1] == (f"final: 50.00% of eligible weights zero, top-1 {final:.2f}% (dense {dense:.2f}%), "
                         "round 1")
    text = done.stdout
    assert "change (groups)" not in text and "layer3.0.conv2.weight" in text
    assert not re.search(r"\b0\.\d{4}\b(?!%)", text.split("training per round")[0]), "a fraction outside the losses"
    percents = re.findall(r"\d+(?:\.\d+)?%", text)
    assert percents and all(re.fullmatch(r"\d+\.\d{2}%", p) for p in percents)
    assert f"{dense:.2f}%" in text and "sparsity of eligible weights" in text and "first loss" in text
    # the same table through a pipe without COLUMNS: 80 columns; a wide terminal gets wider lines
    out = ok("report", "-c", "tiny.yaml")
    assert max(len(line) for line in out.splitlines()) <= 80
    assert out.rstrip().splitlines()[-1] == lines[-1]
    code, wide, _ = invoke("report", "-c", "tiny.yaml", env={"COLUMNS": "200"})
    assert code == 0 and wide.rstrip().splitlines()[-1] == lines[-1]
    # machine-readable formats keep their keys; JSON adds the outcome, markdown ends with the line
    report = json.loads(ok("report", "-c", "tiny.yaml", "-f", "json"))
    assert report["summary"]["sparsity of eligible weights"] == pytest.approx(0.5)
    assert report["outcome"] == {"checkpoint": "003-r01-trained.safetensors", "latest": True, "round": 1,
                                 "sparsity": pytest.approx(0.5), "val_acc1": final, "dense_val_acc1": dense}
    assert ok("report", "-c", "tiny.yaml", "-f", "markdown").rstrip().splitlines()[-1] == lines[-1]
    assert ok("report", "-c", "tiny.yaml", "-f", "csv").splitlines()[0] == (
        "parameter,shape,pattern,groups_kept,groups,sparsity,change,eligible")


def test_long_parameter_names_wrap_after_a_dot():
    import io

    from rich.console import Console

    from sparsify.report.render import _table, break_at_dots

    assert break_at_dots("features.1.0.block.0.0.weight", 26) == "features.1.0.block.0.0.\nweight"
    assert break_at_dots("layer1.0.conv1.weight", 10) == "layer1.0.\nconv1.\nweight"
    assert break_at_dots("a.b", 8) == "a.b"
    assert break_at_dots("aaaaaaaaaaaa", 5) == "aaaaa\naaaaa\naa"  # no dot in reach: cut at the width
    console = Console(width=30, color_system=None, record=True, file=io.StringIO())
    console.print(_table("layers", ["parameter", "shape"], [["features.1.0.block.0.0.weight", "32x1x3x3"]],
                         width=30, left=("parameter", "shape")))
    lines = [line.rstrip() for line in console.export_text().splitlines() if line.strip()]
    assert lines[-2:] == ["features.1.0.block.   32x1x3x3", "0.0.weight"], lines
    assert max(len(line) for line in lines) <= 30


def test_report_says_what_was_not_evaluated(workdir):
    ok("download", "-c", "tiny.yaml")
    ok("prune", "-c", "tiny.yaml")
    last = ok("report", "-c", "tiny.yaml").rstrip().splitlines()[-1]
    assert last == "final: 50.00% of eligible weights zero, top-1 not evaluated (no dense evaluation), round 1"
    earlier = ok("report", "runs/tiny/checkpoints/000-r00-pretrained.safetensors").rstrip().splitlines()[-1]
    assert earlier.startswith("000-r00-pretrained: 0.00% of eligible weights zero")


# ---------------------------------------------------------------- check


def test_check_accepts_a_dense_checkpoint_whose_metadata_names_the_pattern(workdir):
    ok("download", "-c", "tiny.yaml")
    code, out, err = invoke("check", "runs/tiny/checkpoints/000-r00-pretrained.safetensors")
    assert code == 0, err
    assert "no layer pruned yet" in out and "follows block 8x8" in out
    result = json.loads(ok("check", "runs/tiny/checkpoints/000-r00-pretrained.safetensors", "-f", "json"))
    assert result["follows"] and result["kind"] == "checkpoint" and result["pruned"] is False


# ---------------------------------------------------------------- download refuses what train would


def bad_data(workdir, case):
    if case == "classes":
        return ["--set", "data.dataset=digits", "--set", "model.num_classes=5"], "digits has 10 classes"
    if case == "empty-imagefolder":
        for split in ("train", "val"):
            for name in ("cat", "dog"):
                (workdir / "img" / split / name).mkdir(parents=True)
        (workdir / "img/train/cat/a.jpg").write_bytes(b"")  # one image: dog and val/* still have none
        return (["--set", "data.dataset=imagefolder", "--set", "data.root=img", "--set", "model.num_classes=null"],
                "holds no image")
    if case == "cifar":
        return ["--set", "data.dataset=cifar10", "--set", "data.root=nowhere", "--set", "model.num_classes=null"], (
            "cifar10 files under nowhere/cifar-10-batches-py are missing")
    return (["--set", "data.dataset=fashion-mnist", "--set", "data.root=nowhere", "--set", "model.num_classes=null"],
            "fashion-mnist file nowhere/train-images-idx3-ubyte.gz is missing")


@pytest.mark.parametrize("case", ["classes", "empty-imagefolder", "cifar", "fashion-mnist"])
def test_download_refuses_data_settings_that_train_would_refuse(workdir, case):
    settings, message = bad_data(workdir, case)
    code, _, err = invoke("download", "-c", "tiny.yaml", *settings)
    assert code == 1 and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (workdir / "runs").exists()


# ---------------------------------------------------------------- a failing train changes nothing


def test_a_failing_train_leaves_config_and_metrics_as_they_were(workdir, monkeypatch):
    from sparsify.errors import SparsifyError

    ok("download", "-c", "tiny.yaml")
    config_before = (run_dir(workdir) / "config.yaml").read_bytes()

    def failing_evaluate(*args, **kwargs):  # after every training step has logged its row
        raise SparsifyError("evaluation failed")

    with monkeypatch.context() as patch:
        patch.setattr("sparsify.training.stage.evaluate", failing_evaluate)
        code, _, err = invoke("train", "-c", "tiny.yaml", "--set", "train.lr=0.02")
    assert code == 1 and "evaluation failed" in err
    assert (run_dir(workdir) / "config.yaml").read_bytes() == config_before
    assert not (run_dir(workdir) / "metrics.csv").exists()
    ok("train", "-c", "tiny.yaml")  # rows of a stage that succeeded stay; a later failure adds none
    rows_before = (run_dir(workdir) / "metrics.csv").read_text()
    assert rows_before.count("\n") == 3  # header + 2 steps
    with monkeypatch.context() as patch:
        patch.setattr("sparsify.training.stage.evaluate", failing_evaluate)
        code, _, _ = invoke("train", "-c", "tiny.yaml", "--set", "train.lr=0.02")
    assert code == 1
    assert (run_dir(workdir) / "metrics.csv").read_text() == rows_before
    assert b"lr: 0.02" not in (run_dir(workdir) / "config.yaml").read_bytes()


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_get_the_same_umask_mode_as_every_other_file(workdir, umask):
    old = os.umask(umask)
    try:
        ok("download", "-c", "tiny.yaml")
        ok("train", "-c", "tiny.yaml")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = [p for p in run_dir(workdir).rglob("*") if p.is_file() and p.name != ".lock"]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "metrics.csv" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(expected) for p in files}


# ---------------------------------------------------------------- help, version, no config


def test_help_shows_nothing_after_flags_that_take_no_value():
    for command in ([], ["download"], ["report"], ["check"], ["train"]):
        code, out, _ = invoke(*command, "--help")
        assert code == 0 and "<bool>" not in out
        flags = [line for line in out.splitlines() if re.match(r"\s+(--help|--force|--version)\b", line)]
        assert flags and all(re.match(r"\s+--[a-z]+\s{2,}\S", line) for line in flags), flags
    assert "--set KEY=VALUE" in invoke("download", "--help")[1]
    # at 80 columns every command's one-line description is whole
    out = invoke("--help", env={"COLUMNS": "80"})[1]
    commands = out.split("Commands:")[1].strip().splitlines()
    assert len(commands) >= 12 and not [line for line in commands if line.endswith("...") or len(line) > 80], commands


def test_version_names_sparsify_and_torch_without_importing_torch():
    from importlib.metadata import version

    from sparsify import __version__

    code, out, _ = invoke("--version")
    assert code == 0 and out.startswith(f"sparsify {__version__} (torch {version('torch')}")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparsify", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("sparsify ")
    assert not [line for line in done.stderr.splitlines() if re.search(r"\|\s+torch(\.|$)", line)]


def test_running_on_the_defaults_is_said_on_stderr(workdir):
    code, out, err = invoke("config")
    assert code == 0 and "name: run" in out
    assert "no config given (-c PATH); using the built-in defaults: run 'run' in runs/run" in err
    (workdir / "empty.yaml").write_text("# nothing yet\n")
    code, _, err = invoke("config", "-c", "empty.yaml")
    assert code == 0 and "empty.yaml is empty; using the built-in defaults" in err
    code, _, err = invoke("config", "-c", "tiny.yaml")
    assert code == 0 and "note:" not in err
    # --nproc: the launcher checks the config and the run folder before it starts any process, and a
    # refusal there reads as one note and one error (not one per process, nor the launcher's own lines)
    done = subprocess.run([sys.executable, "-m", "sparsify", "train", "--nproc", "2"], cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("no config given (-c PATH)") == 1, done.stderr
    assert done.stderr.splitlines()[-1] == ("error: run folder runs/run does not exist; start the run with "
                                            "`sparsify download`") and len(done.stderr.splitlines()) == 2, done.stderr


def test_nproc_refuses_a_run_without_a_checkpoint_before_starting_processes(workdir):
    """A run folder made but never downloaded into: `sensitivity --nproc 2` and `train --nproc 2` say so once."""
    (workdir / "runs/tiny").mkdir(parents=True)
    for command in ("sensitivity", "train"):
        done = subprocess.run([sys.executable, "-m", "sparsify", command, "-c", "tiny.yaml", "--nproc", "2"],
                              cwd=workdir, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.splitlines() == [
            "error: run folder runs/tiny has no checkpoint yet; start it with `sparsify download`"], done.stderr
    assert not (workdir / "runs/tiny/checkpoints").exists()


def test_nproc_refuses_another_model_once(workdir):
    ok("download", "-c", "tiny.yaml")
    done = subprocess.run([sys.executable, "-m", "sparsify", "train", "-c", "tiny.yaml", "--set",
                           "model.arch=small_resnet", "--nproc", "2"], cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: run 'tiny' holds model 'tiny_resnet' but the config says 'small_resnet'")


def test_report_on_a_run_not_started_says_where_it_looked(workdir):
    code, _, err = invoke("report", "-c", "tiny.yaml")
    assert code == 1 and err.strip() == (
        "error: runs/tiny does not exist: give a run folder or a checkpoint file (relative paths, and runs_dir, "
        "are from the current folder), or start the run with `sparsify download`")
    code, _, err = invoke("report", "/dev/null")
    assert code == 1 and err.strip() == "error: /dev/null is neither a run folder nor a checkpoint file; give one of those"
