"""Exact resume: a train stage killed with SIGKILL mid-epoch and rerun ends bit-identical to an uninterrupted one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsify import stages
from sparsify.config import load_config

CONFIG = textwrap.dedent(
    """\
    name: {name}
    seed: 0
    device: cpu
    model: {{arch: tiny_resnet, num_classes: 4}}
    data: {{dataset: fake, fake_samples: 192, batch_size: 8}}
    sparsity: {{target: 0.5, step: 0.5}}
    train: {{lr: 0.05, epochs: 2, deterministic: true, save_every_steps: 3, save_every_minutes: null,
             log_every: 3, lr_schedule: cosine, warmup_steps: 4, label_smoothing: 0.1,
             ema: {{decay: 0.9, every: 2}}}}
    """
)


def sparsify_train(config: Path, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: same results, and no oversubscribed cores
    return subprocess.Popen([sys.executable, "-m", "sparsify", "train", "-c", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def kill_after_first_train_state(config: Path, state: Path) -> None:
    proc = sparsify_train(config)
    deadline = time.monotonic() + 180
    while not state.exists():
        assert proc.poll() is None, "the stage ended before writing a train-state: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_then_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("whole", "killed"):
        (tmp_path / f"{name}.yaml").write_text(CONFIG.format(name=name))
    whole = load_config(tmp_path / "whole.yaml")
    stages.download(whole)
    stages.prune(whole)
    shutil.copytree(tmp_path / "runs/whole", tmp_path / "runs/killed")
    run = tmp_path / "runs/killed"
    state = run / "train-state.safetensors"

    uninterrupted = sparsify_train(tmp_path / "whole.yaml")
    kill_after_first_train_state(tmp_path / "killed.yaml", state)
    assert uninterrupted.wait(timeout=240) == 0, uninterrupted.stderr.read()[-2000:]
    assert len(list((run / "checkpoints").iterdir())) == 2  # nothing written but the train-state
    rerun = sparsify_train(tmp_path / "killed.yaml")
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-2000:]
    assert "resuming from train-state.safetensors" in err
    assert not state.exists()

    a = load_file(tmp_path / "runs/whole/checkpoints/002-r01-trained.safetensors")
    b = load_file(run / "checkpoints/002-r01-trained.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["pretrained", "pruned", "trained"]
    whole_history = [json.loads(line) for line in (tmp_path / "runs/whole/history.jsonl").read_text().splitlines()]
    same = ("loss", "acc1", "val_loss", "val_acc1", "val_acc5", "epochs")  # what the stage reports matches too
    assert {k: history[-1]["metrics"][k] for k in same} == {k: whole_history[-1]["metrics"][k] for k in same}
    steps = [int(line.split(",")[4]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(3, 49, 3))  # rows the killed run wrote after its last save were dropped
