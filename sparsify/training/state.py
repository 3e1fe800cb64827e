"""The train-state file: everything a train stage needs to continue exactly where it stopped.

`runs/<name>/train-state.safetensors` holds the model weights and masks in the middle of the
stage, the optimizer, GradScaler, EMA and callbacks' state (tensors under `opt.`, `scaler.`,
`ema.`, `cb<i>.`; the rest of each nested state as JSON with tensor references), the RNG
states of every rank (`rng.<rank>.*`), and JSON metadata: the checkpoint the stage started
from and its sha256, the config hash, epochs, the position (epoch, batch, step) and the
world size. Written atomically like a checkpoint; nothing is unpickled when it is read.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from sparsify.io.checkpoint import _cpu_tensors, read_metadata
from sparsify.io.tensorfile import write_tensor_file
from sparsify.errors import CheckpointError, TrainStateDamaged

STATE_FORMAT = 1
_TENSOR = "__tensor__"


@dataclass
class TrainState:
    """A train stage in progress: position, nested component states and per-rank RNG."""

    start_checkpoint: str
    start_sha256: str
    config_hash: str
    epochs: int
    world_size: int
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps done in the stage
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, Any] = field(default_factory=dict)  # optimizer, scaler, ema, callbacks
    rng: list[dict[str, Any]] = field(default_factory=list)  # one entry per rank

    def matches(self, *, start_checkpoint: str, start_sha256: str, config_hash: str, epochs: int) -> bool:
        """True when this state belongs to the stage about to start."""
        return (self.start_checkpoint, self.start_sha256, self.config_hash, self.epochs) == (
            start_checkpoint, start_sha256, config_hash, epochs)


# ---------------------------------------------------------------- nested state <-> tensors + JSON


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready copy of `obj` whose tensors are moved into `tensors` under `prefix...` keys."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, prefix, tensors), flatten(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [flatten(v, prefix, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in the train-state; "
                          "state_dict() values must be tensors, numbers, strings, lists or dicts")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (if present), python `random`, numpy."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` took."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------- file


def save_train_state(path: Path, state: TrainState) -> None:
    """Write the train-state atomically (temporary file, fsync, rename); WriteFailed keeps the old one."""
    tensors: dict[str, torch.Tensor] = {}
    parts = flatten(state.parts, "part.", tensors)
    rng = flatten(state.rng, "rng.", tensors)
    tensors.update(_cpu_tensors(state.model, "model."))
    tensors.update(_cpu_tensors(state.masks, "mask."))
    meta = {
        "train_state_format": STATE_FORMAT, "start_checkpoint": state.start_checkpoint,
        "start_sha256": state.start_sha256, "config_hash": state.config_hash, "epochs": state.epochs,
        "world_size": state.world_size, "epoch": state.epoch, "batch": state.batch, "step": state.step,
        "parts": parts, "rng": rng,
    }
    metadata = {key: json.dumps(value) for key, value in meta.items()}
    write_tensor_file(Path(path), tensors, metadata)


def load_train_state(path: Path) -> TrainState:
    """Read a train-state; TrainStateDamaged if it cannot be read, CheckpointError if of another format."""
    path = Path(path)
    try:
        meta = {k: json.loads(v) for k, v in read_metadata(path).items()}
    except CheckpointError as exc:  # the reader's line is "<what is wrong>; <fix>": the fix differs here
        raise TrainStateDamaged(str(exc).split("; ")[0]) from None
    except ValueError as exc:
        raise TrainStateDamaged(f"{path} has metadata that is not JSON ({exc})") from None
    found = meta.get("train_state_format", STATE_FORMAT)
    if found != STATE_FORMAT:
        raise CheckpointError(f"{path} is a train-state of format {found!r}; this sparsify reads format "
                              f"{STATE_FORMAT}: delete it to start the stage again")
    try:
        return decode_train_state(meta, load_file(path))
    except Exception as exc:  # safetensors' own errors, parts that are missing or of the wrong type
        raise TrainStateDamaged(f"{path} is not a readable train-state ({type(exc).__name__}: {exc})") from None


def decode_train_state(meta: dict, tensors: dict[str, torch.Tensor]) -> TrainState:
    """A TrainState from the file's decoded metadata and tensors (KeyError/TypeError if parts are missing)."""
    if "train_state_format" not in meta:
        raise KeyError("train_state_format")
    model, masks, rest = {}, {}, {}
    for key, value in tensors.items():
        if key.startswith("model."):
            model[key[6:]] = value
        elif key.startswith("mask."):
            masks[key[5:]] = value
        else:
            rest[key] = value
    return TrainState(
        start_checkpoint=meta["start_checkpoint"], start_sha256=meta["start_sha256"],
        config_hash=meta["config_hash"], epochs=meta["epochs"], world_size=meta["world_size"],
        epoch=meta["epoch"], batch=meta["batch"], step=meta["step"], model=model, masks=masks,
        parts=unflatten(meta["parts"], rest), rng=unflatten(meta["rng"], rest),
    )


def read_train_state(path: Path, *, set_aside: bool, log) -> TrainState | None:
    """The train-state at `path`; None when there is none, or when it cannot be read: then (if `set_aside`,
    the main rank) it is renamed to `<name>.damaged` with a warning, and the stage starts from its beginning."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_train_state(path)
    except TrainStateDamaged as exc:
        aside = path.with_name(path.name + ".damaged")
        if set_aside:
            path.replace(aside)
        log(f"warning: {exc}; moved it to {aside.name} (remove it when you no longer need it), "
            "so this stage starts from its beginning")
        return None
