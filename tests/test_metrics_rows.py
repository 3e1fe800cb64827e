"""Every metrics.csv row's loss is the mean per-image loss of the steps since the previous row:
across epochs, after a resume, summed over ranks; an epoch resumed part-way reports all its batches; and the
quickstart's rows are all plausible."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import resume_from, saver_at
from loss_window_ranks import recorded_steps, tiny_run
from sparsify.cli import app
from sparsify.training.trainer import Position
from sparsify.training.log import read_rows

ROOT = Path(__file__).resolve().parents[1]


def expected_losses(rows: list[dict], per_rank_steps: list[list]) -> list[float]:
    """Mean of loss * n over n for the steps of each row's window, over every rank."""
    means, previous = [], 0
    for row in rows:
        step = int(row["step"])
        window = [pair for steps in per_rank_steps for pair in steps[previous:step]]
        means.append(sum(loss * n for loss, n in window) / sum(n for _, n in window))
        previous = step
    return means


@pytest.fixture
def steps(monkeypatch):
    from sparsify.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "step", Trainer.step)  # undone after the test
    recorded: list = []
    recorded_steps(recorded)
    return recorded


def test_rows_are_window_means_across_epoch_boundaries(tmp_path, steps):
    tiny_run(tmp_path / "metrics.csv")
    rows = read_rows(tmp_path / "metrics.csv")
    # 11 batches per epoch, a row every 3 steps and at each epoch's end
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 11, 12, 15, 18, 21, 22, 24, 27, 30, 33]
    assert [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 5 + [2] * 4
    assert [float(r["loss"]) for r in rows] == pytest.approx(expected_losses(rows, [steps]), abs=1e-6)
    assert all(float(r["loss"]) > 0 for r in rows)


def test_a_resumed_stage_writes_the_rows_of_an_uninterrupted_one(tmp_path, steps):
    tiny_run(tmp_path / "full.csv")
    full = read_rows(tmp_path / "full.csv")
    path = tmp_path / "train-state.safetensors"
    tiny_run(tmp_path / "first.csv", save_state=saver_at(path, 16, epochs=3))  # mid-window (rows at 15, 18), mid-epoch
    tiny_run(tmp_path / "resumed.csv", resume=resume_from(path))
    before = [r for r in read_rows(tmp_path / "first.csv") if int(r["step"]) <= 16]
    rows = before + read_rows(tmp_path / "resumed.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in full]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in full], abs=1e-6)


def test_an_epoch_resumed_part_way_reports_the_loss_and_top1_of_all_its_batches(tmp_path, steps):
    whole = tiny_run(tmp_path / "full.csv")
    path = tmp_path / "train-state.safetensors"
    tiny_run(tmp_path / "first.csv", save_state=saver_at(path, 28, epochs=3))  # 6 of the last epoch's 11 batches
    resumed = tiny_run(tmp_path / "resumed.csv", resume=resume_from(path))
    assert (resumed["loss"], resumed["acc1"]) == pytest.approx((whole["loss"], whole["acc1"]), abs=1e-9)


def test_a_resume_saved_after_an_epochs_last_batch_goes_on_with_the_next_epoch(tmp_path, steps):
    def resume(trainer):
        return Position(epoch=0, batch=11, step=11)

    tiny_run(tmp_path / "metrics.csv", epochs=2, resume=resume)
    rows = read_rows(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1] * 5 and len(steps) == 11


def test_rows_sum_the_windows_of_every_rank(tmp_path):
    script = Path(__file__).parent / "loss_window_ranks.py"
    paths = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path / "metrics.csv")
    per_rank = [json.loads((tmp_path / f"steps-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 18 and per_rank[0] != per_rank[1]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15, 18]
    assert [float(r["loss"]) for r in rows] == pytest.approx(expected_losses(rows, per_rank), abs=1e-6)
    resumed = read_rows(tmp_path / "resumed.csv")  # the windows and the epoch's sums: totals over both ranks
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows if int(r["step"]) > 16]
    last = json.loads((tmp_path / "last-epoch.json").read_text())
    assert (last["resumed"]["loss"], last["resumed"]["acc1"]) == pytest.approx(
        (last["whole"]["loss"], last["whole"]["acc1"]), abs=1e-9)


def test_the_quickstart_writes_only_plausible_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "-c", str(ROOT / "configs/quickstart.yaml"), "--set", "device=cpu"])
    assert result.exit_code == 0, result.stderr
    rows = read_rows(tmp_path / "runs/quickstart/metrics.csv")
    assert len(rows) > 20
    for row in rows:
        loss = float(row["loss"])
        assert math.isfinite(loss) and 0 < loss < 10, row  # 10 classes: a random model starts near ln 10 = 2.3
        assert 0 <= float(row["lr"]) <= 0.05 and float(row["images_per_s"]) > 0 and 0 <= float(row["data_wait"]) <= 1
    by_start: dict[str, list[int]] = {}
    for row in rows:
        by_start.setdefault(row["start"], []).append(int(row["step"]))
    assert all(steps == sorted(set(steps)) for steps in by_start.values())
