"""What every stage shares: the run folder's prologue, loaders for a checkpoint's model, and the
one helper that writes a stage's checkpoint and history line."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from sparsify import __version__
from sparsify.config import RunConfig, config_hash, config_to_yaml
from sparsify.core.patterns import build_pattern, describe_pattern
from sparsify.errors import SparsifyError
from sparsify.io.checkpoint import Checkpoint, save_checkpoint
from sparsify.io.files import atomic_write_bytes, move_into_place, staging_path
from sparsify.io.rundir import RunDir, history_entry
from sparsify.io.restore import LoadedRun, load_run
from sparsify.registry import DATASETS
from sparsify.rounds.hooks import carried_meta


@dataclass
class StageResult:
    """What a finished stage wrote."""

    command: str
    round: int
    stage: str
    checkpoint: Path | None
    sparsity: float
    metrics: dict
    seconds: float
    message: str = ""


def resolve_shapes(config: RunConfig) -> dict:
    """num_classes, in_channels and input_size: from the config, else from the dataset/model."""
    from sparsify.data.datasets import dataset_info
    from sparsify.models.build import default_in_channels, default_input_size
    from sparsify.models.tvmodels import check_train_input_size

    info = dataset_info(config.data, num_classes=config.model.num_classes)
    input_size = config.model.input_size
    if input_size is None and DATASETS.get(config.data.dataset).decodes_files:
        input_size = default_input_size(config.model.arch, weights=config.model.weights) or 224
    check_train_input_size(config.model.arch, input_size or info.input_size)
    return {
        "num_classes": config.model.num_classes or info.num_classes,
        "in_channels": config.model.in_channels or default_in_channels(config.model.arch) or info.in_channels,
        "input_size": input_size or info.input_size,
    }


def image_preset_for(meta: dict):
    """The image transforms preset of the checkpoint's model (its weights' eval resize and crop)."""
    from sparsify.models.build import image_preset

    return image_preset(meta["arch"], weights=meta.get("weights"), input_size=meta["input_size"])


def checkpoint_loaders(config: RunConfig, meta: dict, *, seed: int, pin_memory: bool, rank: int = 0,
                       world_size: int = 1):
    """(train, val) loaders shaped for the checkpoint's model (its input size, classes, preset)."""
    from sparsify.data.datasets import build_loaders

    return build_loaders(config.data, input_size=meta["input_size"], num_classes=meta["num_classes"],
                         in_channels=meta["in_channels"], seed=seed, pin_memory=pin_memory,
                         preset=image_preset_for(meta), rank=rank, world_size=world_size)


def model_sparsity(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], pattern) -> float:
    """Zeroed weights over all weights of the masked (eligible and pruned) layers."""
    if not masks:
        return 0.0
    zeros = total = 0
    for name, mask in masks.items():
        sizes = pattern.group_sizes(tuple(state[name].shape))
        zeros += int(sizes[~mask].sum())
        total += state[name].numel()
    return zeros / total

def write_stage(run: RunDir, config: RunConfig, *, command: str, parent: Checkpoint | None,
                model: nn.Module, masks: dict, round_: int, stage: str, metrics: dict,
                started: float, extra_meta: dict | None = None, extra_tensors: dict | None = None,
                replacing: Callable[[], None] | None = None) -> StageResult:
    """Save the stage's checkpoint and append its history line (`extra_tensors`: e.g. `gumbel.*`).

    `replacing` (download --force) empties the run: it is called once the checkpoint is written aside, so a write
    that fails (no space, a file-size limit) leaves the old run as it was; the checkpoint then starts the run.
    """
    run.make_checkpoints_dir()
    path = run.checkpoint_path(0, round_, stage) if replacing else run.next_checkpoint_path(round_, stage)
    base = parent.meta if parent else {}
    pattern_spec = base.get("pattern") or config.sparsity.pattern.model_dump()
    state = model.state_dict()
    same_round = base.get("round") == round_
    meta = {
        "arch": base.get("arch", config.model.arch), "num_classes": base.get("num_classes"),
        "in_channels": base.get("in_channels"), "input_size": base.get("input_size"),
        "round": round_, "stage": stage, "pattern": pattern_spec,
        "criterion": config.sparsity.criterion, "target": config.sparsity.target,
        "sparsity_config": config.sparsity.model_dump(mode="json"),
        "parent": parent.path.name if parent else None, "parent_sha256": parent.sha256 if parent else None,
        "config_hash": config_hash(config), "metrics": metrics, "versions": versions(),
        "created": now(), "threads": torch.get_num_threads(),
        "prune_log": base.get("prune_log", []) if same_round else [],
        **({"layer_targets": base["layer_targets"]} if same_round and "layer_targets" in base else {}),
        **carried_meta(base, same_round=same_round),  # permutation, the round's regroup statistics
    }
    meta.update(extra_meta or {})
    sparsity = model_sparsity(state, masks, build_pattern(pattern_spec))
    seconds = time.perf_counter() - started
    # what the history line says besides the metadata: the next command under the lock writes that line from
    # it when this one is killed between making the checkpoint visible and appending the line
    meta["record"] = {"command": command, "sparsity": round(sparsity, 6), "seconds": round(seconds, 3)}
    if replacing:
        staged = staging_path(path, run.root)
        sha = save_checkpoint(staged, state, masks, meta, extra=extra_tensors)
        try:
            replacing()
            move_into_place(staged, path)
        finally:
            staged.unlink(missing_ok=True)  # gone once moved in; a failure to empty the run leaves nothing behind
    else:
        sha = save_checkpoint(path, state, masks, meta, extra=extra_tensors)
    entry = history_entry(meta, path.name, sha, now())
    try:
        run.append_history(entry)
    except SparsifyError as exc:  # no checkpoint without its history line: the next stage would take it unchecked
        path.unlink(missing_ok=True)
        if replacing:
            raise SparsifyError(str(exc).replace("nothing was changed", "the old checkpoints were already deleted"))
        raise
    return StageResult(command, round_, stage, path, sparsity, metrics, seconds)


def versions() -> dict:
    """Versions of the packages that wrote a checkpoint (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"sparsify": __version__, "torch": torch.__version__}
    for package in ("torchvision", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_resolved_config(run: RunDir, config: RunConfig) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.root / "config.yaml", config_to_yaml(config).encode())


def check_same_model(config: RunConfig, meta: dict) -> None:
    """Refuse a config whose model.arch or model.num_classes (when set) differs from the run's checkpoint: the
    stage would use the checkpoint's model and ignore the config's."""
    if meta.get("arch") != config.model.arch:
        raise SparsifyError(f"run {config.name!r} holds model {meta.get('arch')!r} but the config says "
                            f"{config.model.arch!r}; drop the --set or set model.arch: {meta.get('arch')}, "
                            "or use another run (another name:)")
    classes = config.model.num_classes
    if classes is not None and meta.get("num_classes") is not None and classes != meta["num_classes"]:
        raise SparsifyError(f"run {config.name!r} holds a model with {meta['num_classes']} classes but the config "
                            f"says model.num_classes {classes}; drop the --set or set model.num_classes: "
                            f"{meta['num_classes']} (or null), or use another run (another name:)")


def check_same_run(config: RunConfig, meta: dict) -> None:
    """Refuse a config whose model or pattern disagrees with the run's checkpoints."""
    check_same_model(config, meta)
    wanted = config.sparsity.pattern.model_dump()
    if meta.get("pattern") and meta["pattern"] != wanted:
        raise SparsifyError(f"run {config.name!r} was pruned with pattern {describe_pattern(meta['pattern'])} but "
                            f"the config says {describe_pattern(wanted)}; start a new run (another name:)")


@contextmanager
def opened_run(config: RunConfig, command: str) -> Iterator[tuple[RunDir, LoadedRun, float]]:
    """The stage prologue: lock the run folder, load its latest checkpoint, check it is this config's run."""
    run = RunDir(config.run_dir)
    with run.lock(command):
        started = time.perf_counter()
        loaded = load_run(run)
        check_same_run(config, loaded.checkpoint.meta)
        yield run, loaded, started
