"""Shared fixtures: a tiny fake-data run config in a fresh working directory, and the CLI in-process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

TINY = {  # a run that takes a second or two per stage on a CPU
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"arch": "tiny_resnet", "num_classes": 4},
    "data": {"dataset": "fake", "fake_samples": 16, "batch_size": 8},
    "sparsity": {"target": 0.5, "step": 0.5},
    "train": {"lr": 0.01},
}


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
def tiny_config(tmp_path, monkeypatch):
    """`tiny_config(**sections)` writes tiny.yaml (TINY with `sections` merged) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)

    def write(name: str = "tiny", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(merged(TINY, {"name": name, **sections}), sort_keys=False))
        return path

    return write


@pytest.fixture
def cli():
    """`cli(*args)` runs one sparsify command in-process; returns (exit code, stdout, stderr)."""
    from sparsify.cli import app

    def invoke(*args) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke
