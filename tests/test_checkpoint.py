"""Checkpoints load back bit-exactly; truncated or altered files are refused; one command per run."""

import hashlib
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


def every_dtype():
    torch.manual_seed(1)
    return {"f64": torch.randn(3, dtype=torch.float64), "bf16": torch.randn(2, 3).bfloat16(),
            "i8": torch.tensor([-3, 7], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
            "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "count": torch.tensor(9),
            "empty": torch.zeros(0, 4), "i32": torch.arange(5, dtype=torch.int32)}


def test_the_hash_taken_while_writing_is_the_files_and_safetensors_reads_the_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state, masks, meta = sample()
    state.update(every_dtype())
    path = tmp_path / "a.safetensors"
    sha = save_checkpoint(path, state, masks, meta)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    plain = load_file(path)
    assert set(plain) == {f"model.{k}" for k in state} | {"mask.conv.weight"}
    for key, value in state.items():
        assert plain[f"model.{key}"].dtype == value.dtype and torch.equal(plain[f"model.{key}"], value)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["pattern"]) == meta["pattern"]
    ckpt = load_checkpoint(path, expected_sha256=sha)
    for key, value in state.items():
        assert ckpt.state[key].dtype == value.dtype and torch.equal(ckpt.state[key], value), key


def test_the_same_checkpoint_gives_the_same_bytes(tmp_path):
    state, masks, meta = sample()
    first = save_checkpoint(tmp_path / "a.safetensors", state, masks, meta)
    second = save_checkpoint(tmp_path / "b.safetensors", dict(reversed(state.items())), masks, meta)
    assert first == second


def test_files_written_by_safetensors_load_misaligned_ones_too(tmp_path):
    from safetensors.torch import save_file

    state, masks, meta = sample()
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"mask.{k}": v for k, v in masks.items()}}
    metadata = {key: json.dumps(value) for key, value in {**meta, "format": 1}.items()}
    save_file(tensors, tmp_path / "theirs.safetensors", metadata=metadata)
    ckpt = load_checkpoint(tmp_path / "theirs.safetensors")
    assert all(torch.equal(ckpt.state[k], v) for k, v in state.items())
    # a header of odd length puts the float data at an odd offset: read by copying, not refused
    header = {"__metadata__": {"format": "1"}, "model.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "model.b": {"dtype": "I8", "shape": [1], "data_offsets": [8, 9]}}
    text = json.dumps(header).encode()
    text += b" " * (1 - len(text) % 2)  # odd
    data = torch.tensor([1.5, -2.0]).numpy().tobytes() + b"\x07"
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    odd = load_checkpoint(tmp_path / "odd.safetensors")
    assert torch.equal(odd.state["w"], torch.tensor([1.5, -2.0])) and odd.state["b"].item() == 7


@pytest.mark.parametrize("entry, expected", [
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "has 8 bytes for shape \\[3\\]"),
    ({"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}, "unreadable dtype"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, "starts at byte 4, not 0"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "need 4 bytes of data and the file holds 8"),
])
def test_headers_that_do_not_tile_the_data_are_refused(tmp_path, entry, expected):
    header = json.dumps({"__metadata__": {"format": "1"}, "model.w": entry}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=f"damaged or truncated .*{expected}"):
        load_checkpoint(path)


def test_the_finite_check_is_exact_where_a_sum_overflows():
    from sparsify.io.checkpoint import nonfinite_entries

    tensors = {"big": torch.full((4,), 3e38), "half": torch.full((3,), 60000.0).half(),
               "nan": torch.tensor([1.0, float("nan")]), "inf": torch.tensor([-float("inf"), 0.0]),
               "ints": torch.tensor([1, 2])}
    assert nonfinite_entries(tensors) == ["nan", "inf"]
