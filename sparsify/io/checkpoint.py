"""Checkpoints (safetensors: weights + masks + JSON metadata) and the run folder that holds them.

File layout: tensor keys `model.<fqn>` for every state_dict entry, `mask.<fqn>` (bool, one
entry per group) for each pruned weight and, for method gumbel, `gumbel.logits.<fqn>` and
`gumbel.pruned.<fqn>`; every metadata value is JSON text. Writes are atomic
(temporary file in the same folder, fsync, rename) and a run folder is locked by one command.

A save writes the tensors' memory straight to the file (no serialized copy) while a second
thread hashes the same memory; a load maps the file once (no read into a buffer, no copy) and
hashes the mapping in a second thread while the tensors, views into it, are checked: one
reduction per tensor finds NaN/inf, and for a masked weight the same pass (the magnitude of each
group) also finds a nonzero inside a pruned group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsify.core.masks import check_mask_shapes, check_masks
from sparsify.core.patterns import build_pattern
from sparsify.errors import CheckpointError
from sparsify.io.tensorfile import MappedFile, read_header, write_tensor_file
from sparsify.registry import METHODS

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: model state, group masks and decoded metadata."""

    path: Path
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if ptr in seen:  # safetensors refuses shared storage: store tied tensors as copies
            tensor = tensor.clone()
        seen.add(ptr)
        out[prefix + key] = tensor
    return out


def nonfinite_entries(tensors: dict[str, torch.Tensor], sums: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf (weights, BatchNorm statistics, ...).

    One reduction per tensor: a finite sum proves every element finite (NaN and inf propagate);
    only a sum that is not finite (NaN, inf, or an overflow) is looked at element by element.
    `sums` may hold such a sum already taken (of the values or of their magnitudes) by name.
    """
    sums = sums or {}
    bad = []
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        total = sums[name] if name in sums else tensor.sum()
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def describe_nonfinite(names: list[str]) -> str:
    """'conv1.weight' or 'conv1.weight and 3 more tensors'."""
    more = len(names) - 1
    return names[0] + (f" and {more} more tensor{'s' if more > 1 else ''}" if more else "")


def save_checkpoint(path: Path, state: dict, masks: dict, meta: dict, extra: dict | None = None) -> str:
    """Atomically write a checkpoint; returns the file's sha256 (hashed while it is written).

    `extra` holds method tensors under their full keys (`gumbel.logits.<fqn>`, `gumbel.pruned.<fqn>`).
    """
    path = Path(path)
    tensors = _cpu_tensors(state, "model.")
    tensors.update(_cpu_tensors(masks, "mask."))
    tensors.update(_cpu_tensors(extra or {}, ""))
    bad = nonfinite_entries(tensors)
    if bad:  # the loader would refuse the file: never write it
        raise CheckpointError(f"refusing to write {path.name}: NaN or inf in {describe_nonfinite(bad)}; "
                              "the stage that made these values diverged (lower train.lr or set train.clip_grad_norm)")
    metadata = {key: json.dumps(value) for key, value in meta.items()}
    metadata["format"] = json.dumps(FORMAT_VERSION)
    return write_tensor_file(Path(path), tensors, metadata, sha256=True)


def read_metadata(path: Path) -> dict[str, str]:
    """The raw metadata of a safetensors file (reads only its header)."""
    return read_header(path)[0].get("__metadata__") or {}


def is_sparsify_metadata(raw: dict[str, str]) -> bool:
    """True for our checkpoints (a JSON integer `format`, any version); False for e.g. {"format": "pt"}."""
    try:
        return isinstance(json.loads(raw.get("format", "")), int)
    except (ValueError, TypeError):
        return False


NOT_A_CHECKPOINT = ("is not a sparsify checkpoint ({why}); give one that sparsify wrote (runs/<name>/checkpoints/"
                    "*.safetensors: weights, masks and metadata), or check a plain state dict with "
                    "`sparsify check FILE --pattern 2:4|8x8|unstructured`")


def not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    """The one line for a file that holds no sparsify metadata (a plain state dict, a torch.save file)."""
    return CheckpointError(f"{path} {NOT_A_CHECKPOINT.format(why=why)}")


def decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or "format" not in raw:
        raise not_a_checkpoint(path, "a plain state dict: its metadata has no sparsify format")
    if not is_sparsify_metadata(raw):
        raise not_a_checkpoint(path, f"its metadata says format {raw.get('format')!r}, not a sparsify format number")
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
    except (ValueError, TypeError, AttributeError):  # not JSON text, or not a str -> str table
        raise CheckpointError(f"{path} has metadata that is not JSON; it was not written by sparsify") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}; this sparsify reads format {FORMAT_VERSION}"
        )
    return meta


def parse_checkpoint(path: Path, mapped: MappedFile | None = None) -> Checkpoint:
    """Split a checkpoint file into state, masks, extra tensors and metadata, without checking masks.

    State tensors are views into the file's mapping; masks and method tensors are small copies.
    """
    mapped = mapped or MappedFile(path)
    try:
        header, data_start = mapped.header()
    except CheckpointError:  # not safetensors: a torch.save file (zip, or an old pickle) says so
        if bytes(mapped.buffer[:4]) == b"PK\x03\x04" or bytes(mapped.buffer[:1]) == b"\x80":
            raise not_a_checkpoint(path, "a torch.save file, e.g. a plain .pth state dict") from None
        raise
    meta = decode_metadata(header.get("__metadata__") or {}, path)
    tensors = mapped.tensors(header, data_start)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    masks = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("mask.")}
    extra = {k: v.clone() for k, v in tensors.items() if not k.startswith(("model.", "mask."))}  # a method's
    if masks and not isinstance(meta.get("pattern"), dict):
        raise CheckpointError(f"{path} has masks but no pattern in its metadata; it was not written by sparsify")
    return Checkpoint(Path(path), state, masks, meta, extra=extra)


def read_checkpoint(path: Path, mapped: MappedFile | None = None) -> Checkpoint:
    """Parse and validate a checkpoint file (without its hash); CheckpointError if inconsistent."""
    ckpt = parse_checkpoint(path, mapped)
    state, masks, extra = ckpt.state, ckpt.masks, ckpt.extra
    pattern = build_pattern(ckpt.meta["pattern"]) if masks else None
    if masks:
        check_mask_targets(state, masks, source=path)
        check_mask_shapes(state, masks, pattern)
    magnitudes = {name: pattern.group_sum(state[name].abs()) for name in masks}  # one pass per masked weight
    bad = nonfinite_entries({**state, **extra}, sums={name: m.sum() for name, m in magnitudes.items()})
    if bad:
        raise CheckpointError(
            f"{path} holds NaN or inf in {describe_nonfinite(bad)}: the training that wrote it diverged. "
            "Delete this file and every later checkpoint of the run to go back to the last good one, then "
            "train again with a lower train.lr (or train.clip_grad_norm, or amp: bf16 instead of fp16)")
    drifted = [name for name, m in magnitudes.items() if bool(m.reshape(masks[name].shape)[~masks[name]].ne(0).any())]
    if drifted:  # names them in the message every drift check gives
        check_masks(state, {name: masks[name] for name in drifted}, pattern, source=path)
    if extra:
        check_method_tensors(state, masks, extra, source=path)
    return ckpt


def mask_target_problem(name: str, state: dict[str, torch.Tensor]) -> str | None:
    """Why the mask `name` has no weight to mask (none of that name, or not a conv/Linear weight), or None."""
    if name not in state:
        return f"mask {name!r} has no weight of that name in the checkpoint"
    if state[name].dim() < 2:
        return (f"mask {name!r} is for a {state[name].dim()}-D tensor of shape {tuple(state[name].shape)}; "
                "masks belong to conv and Linear weights (2 or more dimensions)")
    return None


def check_mask_targets(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], *, source) -> None:
    """CheckpointError for the first mask without a conv/Linear weight of its name."""
    for name in masks:
        problem = mask_target_problem(name, state)
        if problem:
            raise CheckpointError(f"{source}: {problem}; it was altered: use a checkpoint from the run's checkpoints/")


def check_method_tensors(state: dict, masks: dict, extra: dict, *, source) -> None:
    """Every method whose prefix owns some of `extra` validates its tensors; unknown prefixes are refused."""
    for prefix in sorted({key.split(".", 1)[0] for key in extra}):
        owners = [m for _, m in METHODS.items() if m.tensor_prefix == prefix]
        if not owners:
            raise CheckpointError(f"{source} holds tensors {prefix}.* that no registered method owns; "
                                  "it was written with a plugin that is not loaded (add it to plugins:)")
        owners[0].check_tensors(state, masks, {k: v for k, v in extra.items() if k.startswith(prefix + ".")},
                                source=source)


def load_checkpoint(path: Path, *, expected_sha256: str | None = None) -> Checkpoint:
    """Read and check a checkpoint; with `expected_sha256`, refuse a file that was altered.

    The file is mapped once and hashed in a second thread while it is parsed and checked.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    mapped = MappedFile(path, sha256=True)
    try:
        ckpt = read_checkpoint(path, mapped)
    except CheckpointError:
        _check_digest(path, mapped.sha256(), expected_sha256)  # an altered file says so first
        raise
    ckpt.sha256 = mapped.sha256()
    _check_digest(path, ckpt.sha256, expected_sha256)
    return ckpt


def _check_digest(path: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path} was altered after it was written (sha256 {actual[:12]}..., history says "
            f"{expected[:12]}...); restore it or delete it and the stages after it"
        )


