"""Shared fixtures: a tiny fake-data run config in a fresh working directory, and the CLI in-process."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

TINY = {  # a run that takes a second or two per stage on a CPU: 2 steps an epoch
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"arch": "tiny_resnet", "num_classes": 4},
    "data": {"dataset": "fake", "fake_samples": 32, "batch_size": 16},
    "sparsity": {"target": 0.5, "step": 0.5},
    "train": {"lr": 0.01},
}


def pytest_configure(config):
    """Unexpected exceptions keep their traceback in tests (the CLI's --debug); test_messages checks the one line."""
    os.environ.setdefault("SPARSIFY_DEBUG", "1")


def tiny_yaml(**sections) -> str:
    """TINY with `sections` merged, as YAML text."""
    return yaml.safe_dump(merged(TINY, sections), sort_keys=False)


def invoke(*args, env=None) -> tuple[int, str, str]:
    """One sparsify command in-process; returns (exit code, stdout, stderr)."""
    from sparsify.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied section by section (a None value removes the key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny_sections() -> dict:
    """Changes to TINY for a whole test module (override this fixture in the module)."""
    return {}


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_sections):
    """A fresh working directory holding tiny.yaml (TINY with the module's `tiny_sections`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)
    (tmp_path / "tiny.yaml").write_text(tiny_yaml(**tiny_sections))
    return tmp_path


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    """`tiny_config(**sections)` writes tiny.yaml (TINY with `sections` merged) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)

    def write(name: str = "tiny", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_yaml(name=name, **sections))
        return path

    return write


@pytest.fixture
def cli():
    """`cli(*args)` runs one sparsify command in-process; returns (exit code, stdout, stderr)."""
    return invoke


def saver_at(path: Path, step: int, *, epochs: int):
    """A train loop's `save_state` that writes the train-state at `step` (and at no other step)."""
    from sparsify.training.distributed import current_info
    from sparsify.training.state import TrainState, capture_rng, save_train_state

    def keep(trainer, position):  # written at once: the optimizer's buffers keep changing afterwards
        if position.step == step:
            parts = trainer.parts(trainer.counters_over_ranks())  # every rank sums; rank 0 writes
            if current_info().rank == 0:
                save_train_state(path, TrainState("c", "s", "h", epochs, 1, position.epoch, position.batch,
                                                  position.step, trainer.model.state_dict(),
                                                  dict(trainer.enforcer.masks), parts, [capture_rng()]))

    return keep


def resume_from(path: Path):
    """A train loop's `resume` that puts back the train-state at `path` (one process)."""
    from sparsify.training.state import load_train_state, restore_rng
    from sparsify.training.trainer import Position

    def resume(trainer):
        state = load_train_state(path)
        trainer.model.load_state_dict(state.model)
        trainer.load_parts(state.parts)
        restore_rng(state.rng[0])
        return Position(state.epoch, state.batch, state.step)

    return resume
