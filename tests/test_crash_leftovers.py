"""What a command killed outright leaves in the run folder, and how the next command under the lock tidies it:
temporary files of dead writers, a checkpoint visible without its history line, a stale train-state."""

import json
import os

import torch
from safetensors.torch import save_file

from conftest import invoke
from sparsify.io.rundir import TRAIN_STATE, RunDir


def started_run(workdir):
    """download + prune of the tiny run; its RunDir."""
    for command in ("download", "prune"):
        code, _, err = invoke(command, "-c", "tiny.yaml")
        assert code == 0, err
    return RunDir(workdir / "runs/tiny")


def drop_last_history_line(run: RunDir) -> dict:
    """As if the stage had been killed between making its checkpoint visible and appending the line."""
    lines = run.history_path.read_text().splitlines(keepends=True)
    run.history_path.write_text("".join(lines[:-1]))
    return json.loads(lines[-1])


def test_a_checkpoint_without_its_history_line_gets_it_from_its_record(workdir):
    run = started_run(workdir)
    lost = drop_last_history_line(run)
    assert lost["stage"] == "pruned" and run.recorded_sha256(run.latest()) is None
    code, _, err = invoke("eval", "-c", "tiny.yaml")  # any command that takes the lock
    assert code == 0, err
    found = next(e for e in run.history() if e["checkpoint"] == lost["checkpoint"])
    for key in ("command", "round", "stage", "checkpoint", "sha256", "sparsity", "metrics", "seconds"):
        assert found[key] == lost[key], key
    assert found["recorded_after_a_crash"] is True
    # one line per checkpoint, in order: the next stage starts after the recorded prune
    assert [e["checkpoint"] for e in run.history() if e["stage"] != "eval"] == [p.name for p in run.checkpoints()]


def test_the_train_state_of_the_stage_that_made_the_unrecorded_checkpoint_goes(workdir):
    run = started_run(workdir)
    parent = run.checkpoints()[-2].name
    drop_last_history_line(run)
    state = run.root / TRAIN_STATE
    save_file({"x": torch.zeros(1)}, state, metadata={"start_checkpoint": json.dumps(parent)})
    with run.lock("test"):
        pass
    assert not state.exists()
    save_file({"x": torch.zeros(1)}, state, metadata={"start_checkpoint": json.dumps("000-r00-other.safetensors")})
    drop_last_history_line(run)
    with run.lock("test"):
        pass
    assert state.exists()  # not the stage that made it: a rerun decides about it


def test_temporary_files_of_other_processes_go_and_own_ones_stay(workdir):
    run = started_run(workdir)
    dead = [run.root / ".metrics.csv.999999999.tmp", run.checkpoints_dir / ".002-r01-pruned.safetensors.999999999.tmp"]
    own = run.root / f".config.yaml.{os.getpid()}.tmp"
    other = run.root / ".notes.tmp"  # not a sparsify temporary name
    for path in [*dead, own, other]:
        path.write_bytes(b"partial")
    with run.lock("test"):
        assert not any(path.exists() for path in dead)
        assert own.exists() and other.exists()


def test_download_force_removes_what_the_old_stages_left(workdir):
    run = started_run(workdir)
    for name in ("metrics.csv", "sensitivity.json", TRAIN_STATE):
        (run.root / name).write_text("old")
    code, _, err = invoke("download", "-c", "tiny.yaml", "--force")
    assert code == 0, err
    assert [p.name for p in run.checkpoints()] == ["000-r00-pretrained.safetensors"]
    assert not any((run.root / name).exists() for name in ("metrics.csv", "sensitivity.json", TRAIN_STATE))
    assert [e["checkpoint"] for e in run.history()] == ["000-r00-pretrained.safetensors"]


def test_run_holds_the_lock_between_its_stages_and_its_stages_take_it_again(workdir, monkeypatch):
    import subprocess
    import sys

    from sparsify.config import load_config
    from sparsify.stages import schedule

    config = load_config(workdir / "tiny.yaml", ["schedule.dense_epochs=1", "schedule.final_epochs=0"])
    seen = []
    real_prune = schedule.prune

    def prune_then_look(config):
        result = real_prune(config)  # took the lock run holds: re-entered, not refused
        other = subprocess.run([sys.executable, "-m", "sparsify", "eval", "-c", "tiny.yaml"], cwd=workdir,
                               capture_output=True, text=True, timeout=120)
        seen.append((other.returncode, other.stderr.strip()))
        return result

    monkeypatch.setattr(schedule, "prune", prune_then_look)
    schedule.run_schedule(config)
    assert seen and all(code == 1 and "is in use by pid" in err and "(run)" in err for code, err in seen), seen
    with RunDir(config.run_dir).lock("after"):  # released at the end
        pass


def test_a_checkpoint_copied_in_by_hand_gets_no_history_line(workdir):
    run = started_run(workdir)
    first = run.checkpoints()[0]
    copy = run.checkpoints_dir / "009-r05-trained.safetensors"
    copy.write_bytes(first.read_bytes())  # another parent, another stage than its name says
    lines = run.history_path.read_text()
    with run.lock("test"):
        pass
    assert run.history_path.read_text() == lines


def test_prune_forgets_the_rows_of_a_train_stage_abandoned_on_the_same_checkpoint(workdir):
    from sparsify.training.log import append_row, read_rows

    run = started_run(workdir)
    code, _, err = invoke("train", "-c", "tiny.yaml")
    assert code == 0, err
    trained = run.latest().name
    kept = read_rows(run.root / "metrics.csv")
    for step in (1, 2):  # a train stage from the trained checkpoint, killed before it wrote one
        append_row(run.root / "metrics.csv", {"time": 1, "round": 1, "start": trained, "epoch": 0, "step": step,
                                              "loss": 1.5, "lr": 0.01, "images_per_s": 10, "data_wait": 0})
    code, _, err = invoke("prune", "-c", "tiny.yaml", "--set", "sparsity.target=0.75")
    assert code == 0, err
    assert read_rows(run.root / "metrics.csv") == kept and kept


def test_download_force_that_cannot_delete_an_old_file_says_which_and_leaves_no_staged_checkpoint(workdir):
    run = started_run(workdir)
    (run.root / "metrics.csv").mkdir()  # something unlink cannot remove
    code, _, err = invoke("download", "-c", "tiny.yaml", "--force")
    assert code == 1
    assert "download --force could not delete runs/tiny/metrics.csv (Is a directory)" in err
    assert not [p.name for p in run.root.iterdir() if p.name.endswith(".tmp")]
