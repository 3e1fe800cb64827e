"""Checkpoints load back bit-exactly; truncated or altered files are refused; one command per run."""

import json
import os
import struct

import pytest
import torch

from sparsify.io.checkpoint import load_checkpoint, save_checkpoint
from sparsify.io.rundir import RunDir
from sparsify.errors import CheckpointError, RunLockedError


def sample():
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(16, 16, 3, 3), "bn.running_mean": torch.randn(16),
             "bn.num_batches_tracked": torch.tensor(7), "half": torch.randn(3).half()}
    masks = {"conv.weight": torch.tensor([[True, False], [True, True]])}
    state["conv.weight"][:8, 8:] = 0.0  # the pruned block
    meta = {"arch": "x", "round": 2, "stage": "pruned", "pattern": {"type": "block", "block": [8, 8]}}
    return state, masks, meta


def test_round_trip_is_bit_exact(tmp_path):
    state, masks, meta = sample()
    sha = save_checkpoint(tmp_path / "a.safetensors", state, masks, meta)
    ckpt = load_checkpoint(tmp_path / "a.safetensors", expected_sha256=sha)
    assert ckpt.sha256 == sha
    for key, value in state.items():
        assert ckpt.state[key].dtype == value.dtype and torch.equal(ckpt.state[key], value)
    assert torch.equal(ckpt.masks["conv.weight"], masks["conv.weight"])
    assert ckpt.masks["conv.weight"].dtype == torch.bool
    assert {k: ckpt.meta[k] for k in meta} == meta and ckpt.meta["format"] == 1


def test_tied_tensors_are_stored(tmp_path):
    shared = torch.randn(4, 4)
    save_checkpoint(tmp_path / "t.safetensors", {"a": shared, "b": shared}, {}, {})
    ckpt = load_checkpoint(tmp_path / "t.safetensors")
    assert torch.equal(ckpt.state["a"], ckpt.state["b"])


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_files_are_refused(tmp_path, keep):
    state, masks, meta = sample()
    path = tmp_path / "a.safetensors"
    save_checkpoint(path, state, masks, meta)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        load_checkpoint(path)


def test_altered_bytes_are_refused_against_the_recorded_hash(tmp_path):
    state, masks, meta = sample()
    path = tmp_path / "a.safetensors"
    sha = save_checkpoint(path, state, masks, meta)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="was altered"):
        load_checkpoint(path, expected_sha256=sha)


def test_foreign_or_future_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors", metadata={"format": "2"})
    with pytest.raises(CheckpointError, match="format 2"):
        load_checkpoint(tmp_path / "plain.safetensors")
    header = json.dumps({"__metadata__": {"format": "not json{"}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_masks_that_do_not_fit_or_drifted_weights_are_refused(tmp_path):
    state, masks, meta = sample()
    save_checkpoint(tmp_path / "shape.safetensors", state, {"conv.weight": torch.ones(3, 2, dtype=torch.bool)}, meta)
    with pytest.raises(CheckpointError, match=r"needs a bool mask of shape \(2, 2\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    state["conv.weight"][0, 15, 1, 1] = 1e-30  # any nonzero inside a pruned group, however small
    save_checkpoint(tmp_path / "drift.safetensors", state, masks, meta)
    with pytest.raises(CheckpointError, match="nonzero weights inside pruned groups of conv.weight"):
        load_checkpoint(tmp_path / "drift.safetensors")
    state["conv.weight"][0, 15, 1, 1] = float("nan")  # NaN is refused before it reaches a file
    with pytest.raises(CheckpointError, match="refusing to write nan.safetensors: NaN or inf in model.conv.weight"):
        save_checkpoint(tmp_path / "nan.safetensors", state, masks, meta)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    state, masks, meta = sample()
    save_checkpoint(tmp_path / "a.safetensors", state, masks, meta)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_run_folder_names_sort_in_creation_order(tmp_path):
    run = RunDir(tmp_path / "r")
    run.checkpoints_dir.mkdir(parents=True)
    first = run.next_checkpoint_path(0, "pretrained")
    first.write_bytes(b"x")
    second = run.next_checkpoint_path(1, "pruned")
    assert (first.name, second.name) == ("000-r00-pretrained.safetensors", "001-r01-pruned.safetensors")
    second.write_bytes(b"x")
    assert run.latest() == second


def test_history_lines_and_recorded_hash(tmp_path):
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    run.append_history({"checkpoint": "000-r00-pretrained.safetensors", "sha256": "ab"})
    run.append_history({"checkpoint": "001-r01-pruned.safetensors", "sha256": "cd"})
    assert [e["sha256"] for e in run.history()] == ["ab", "cd"]
    assert run.recorded_sha256(run.checkpoints_dir / "001-r01-pruned.safetensors") == "cd"
    with open(run.history_path, "a") as f:
        f.write("{oops\n")
    with pytest.raises(CheckpointError, match="line 3 is not a JSON object; fix or remove that line"):
        run.history()


def test_second_command_on_a_run_is_refused_with_the_holder(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(CheckpointError, match="does not exist"):
        with run.lock("train"):
            pass
    run.root.mkdir()
    with run.lock("train"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}.*train"):
            with RunDir(tmp_path / "r").lock("prune"):
                pass
    with run.lock("prune"):  # released after the first command ends
        pass
