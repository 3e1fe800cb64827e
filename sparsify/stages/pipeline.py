"""The stages composed: download, prune, train, eval, and `run` (the whole schedule).

Every stage reads the latest checkpoint of the run folder and writes a new one plus one line of
history.jsonl, under the run's lock. Rerunning `run` after a crash continues from the last
finished stage.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from sparsify import __version__
from sparsify.console import log
from sparsify.io.checkpoint import Checkpoint, RunDir, atomic_write_bytes, save_checkpoint
from sparsify.io.restore import LoadedRun, build_model_for, load_run, rebuild  # noqa: F401  (stage helpers)
from sparsify.config import RunConfig, config_hash, config_to_yaml
from sparsify.errors import CheckpointError, SparsifyError, TargetReached
from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.methods.activations import activation_callbacks
from sparsify.methods.base import callbacks_for, stage_meta, stage_tensors
from sparsify.registry import CRITERIA, METHODS
from sparsify.core.patterns import build_pattern, describe_pattern
from sparsify.core.prune import PruneSettings, find_layers, prune_round
from sparsify.rounds.regroup import describe_regroup, imp_at_target, regroup_round
from sparsify.rounds.rewind import rewind_callbacks, rewind_model_, rewind_state
from sparsify.training.distributed import resolve_device
from sparsify.training.loop import evaluate


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


# ---------------------------------------------------------------- loading and saving


def resolve_shapes(config: RunConfig) -> dict:
    """num_classes, in_channels and input_size: from the config, else from the dataset/model."""
    from sparsify.data.datasets import dataset_info
    from sparsify.models.build import check_train_input_size, default_in_channels, default_input_size

    info = dataset_info(config.data, num_classes=config.model.num_classes)
    input_size = config.model.input_size
    if input_size is None and config.data.dataset == "imagefolder":
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
                started: float, extra_meta: dict | None = None, extra_tensors: dict | None = None) -> StageResult:
    """Save the stage's checkpoint and append its history line (`extra_tensors`: e.g. `gumbel.*`)."""
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    path = run.next_checkpoint_path(round_, stage)
    base = parent.meta if parent else {}
    pattern_spec = base.get("pattern") or config.sparsity.pattern.model_dump()
    state = model.state_dict()
    meta = {
        "arch": base.get("arch", config.model.arch), "num_classes": base.get("num_classes"),
        "in_channels": base.get("in_channels"), "input_size": base.get("input_size"),
        "round": round_, "stage": stage, "pattern": pattern_spec,
        "criterion": config.sparsity.criterion, "target": config.sparsity.target,
        "sparsity_config": config.sparsity.model_dump(mode="json"),
        "parent": parent.path.name if parent else None, "parent_sha256": parent.sha256 if parent else None,
        "config_hash": config_hash(config), "metrics": metrics, "versions": versions(),
        "created": now(), "threads": torch.get_num_threads(),
        "prune_log": base.get("prune_log", []) if base.get("round") == round_ else [],
    }
    if base.get("regroup") and base.get("round") == round_:
        meta["regroup"] = base["regroup"]  # the round's regroup statistics stay with its later checkpoints
    if "permutation" in base:  # permuted weights stay permuted in every later checkpoint
        meta["permutation"] = base["permutation"]
    meta.update(extra_meta or {})
    sha = save_checkpoint(path, state, masks, meta, extra=extra_tensors)
    pattern = build_pattern(pattern_spec)
    sparsity = model_sparsity(state, masks, pattern)
    seconds = time.perf_counter() - started
    run.append_history({
        "time": now(), "command": command, "round": round_, "stage": stage, "checkpoint": path.name,
        "sha256": sha, "sparsity": round(sparsity, 6), "metrics": metrics, "seconds": round(seconds, 3),
    })
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


def check_same_run(config: RunConfig, meta: dict) -> None:
    """Refuse a config whose model or pattern disagrees with the run's checkpoints."""
    if meta.get("arch") != config.model.arch:
        raise SparsifyError(f"run {config.name!r} holds model {meta.get('arch')!r} but the config says "
                            f"{config.model.arch!r}; use another name: or --set model.arch={meta.get('arch')}")
    wanted = config.sparsity.pattern.model_dump()
    if meta.get("pattern") and meta["pattern"] != wanted:
        raise SparsifyError(f"run {config.name!r} was pruned with pattern {describe_pattern(meta['pattern'])} but "
                            f"the config says {describe_pattern(wanted)}; start a new run (another name:)")


# ---------------------------------------------------------------- the stages


def download(config: RunConfig, *, force: bool = False) -> StageResult:
    """Round 0: build the model with its starting weights and save it."""
    from sparsify.data.datasets import check_data
    from sparsify.models.build import build_model

    run = RunDir(config.run_dir)
    if run.checkpoints() and not force:
        raise SparsifyError(f"run folder {run.root} already has checkpoints; pass --force to start it again "
                            f"(the old checkpoints are deleted) or choose another name:")
    started = time.perf_counter()
    check_data(config.data, num_classes=config.model.num_classes)  # what train would refuse, before anything is written
    shapes = resolve_shapes(config)
    torch.manual_seed(config.seed)  # random initial weights (and new heads) repeat with the seed
    model = build_model(config.model.arch, num_classes=shapes["num_classes"], in_channels=shapes["in_channels"],
                        weights=config.model.weights, log=log)
    with run.lock("download", create=True):
        if force:
            for path in run.checkpoints():
                path.unlink()
            run.history_path.unlink(missing_ok=True)
        result = write_stage(run, config, command="download", parent=None, model=model, masks={},
                             round_=0, stage="pretrained", metrics={}, started=started,
                             extra_meta={**shapes, "arch": config.model.arch, "weights": config.model.weights})
        save_resolved_config(run, config)
    result.message = f"round 0: {config.model.arch} saved to {result.checkpoint}"
    return result


def prune(config: RunConfig) -> StageResult:
    """One round: zero `step` of the remaining groups in every eligible layer."""
    run = RunDir(config.run_dir)
    with run.lock("prune"):
        started = time.perf_counter()
        loaded = load_run(run)
        meta = loaded.checkpoint.meta
        check_same_run(config, meta)
        if not METHODS.get(config.sparsity.method).prune_rounds:
            raise SparsifyError(f"method {config.sparsity.method} sets the masks while training, so there are no "
                                "prune rounds; use `sparsify train` or `sparsify run`")
        pattern = build_pattern(config.sparsity.pattern.model_dump())
        s = config.sparsity
        layers = find_layers(loaded.model, pattern, include_linear=s.include_linear, exclude=s.exclude)
        eligible = [layer.name for layer in layers if layer.reason is None]
        if not eligible:
            raise SparsifyError("no layer of this model is eligible for pruning; see `sparsify report` for the reasons")
        masks = full_masks(loaded.model, eligible, pattern)
        masks.update({n: m for n, m in loaded.masks.items() if n in masks})
        permute_meta = {}
        if s.permute.enabled and not loaded.masks:  # nm: permute input channels once, before the only round
            from sparsify.rounds.permute import permute_before_prune_

            permute_meta = permute_before_prune_(loaded.model, meta, pattern=pattern, eligible=eligible,
                                                 time_limit=s.permute.time_limit, seed=config.seed)
        settings = PruneSettings(pattern=pattern, criterion=s.criterion, target=s.target, step=s.step,
                                 step_basis=s.step_basis, keep_rows=s.keep_rows, keep_cols=s.keep_cols,
                                 balanced=s.balanced, scope=s.scope)
        weights = dict(loaded.model.named_parameters())
        if s.regroup.enabled and (meta.get("regroup") or {}).get("imp_at_target"):
            raise TargetReached(f"the last prune reached the target ({s.target:.0%}) before regroup; "
                                "nothing left to prune")
        taylor = taylor_saliency(config, loaded, masks, pattern) if CRITERIA.get(s.criterion).needs_gradients else None
        new_masks, entries = prune_round(weights, masks, settings, seed=config.seed, round_=meta["round"] + 1,
                                         taylor=taylor)
        zeroed = sum(e.zeros_after - e.zeros_before for e in entries)
        if zeroed == 0:
            raise TargetReached(_target_message(entries, s.target, scope=s.scope))
        regroup_meta = {}
        if s.regroup.enabled:
            new_masks, regroup_meta["regroup"] = regroup_round(
                new_masks, pattern, s.regroup, at_target=imp_at_target(entries, scope=s.scope, target=s.target))
        if s.rewind is not None:  # kept weights back to the rewind point (BatchNorm state included)
            rewind_model_(loaded.model, rewind_state(run, s.rewind), new_masks, pattern)
        MaskEnforcer(loaded.model, new_masks, pattern).apply_()
        round_ = meta["round"] + 1
        layer_log = [dataclasses.asdict(e) for e in entries]  # name, groups, zeros_before/after, target_zeros, note
        result = write_stage(run, config, command="prune", parent=loaded.checkpoint, model=loaded.model,
                             masks=new_masks, round_=round_, stage="pruned", metrics={}, started=started,
                             extra_meta={"pattern": pattern.spec(), "prune_log": layer_log, **regroup_meta,
                                         **permute_meta})
        save_resolved_config(run, config)
    blocked = [e for e in entries if e.note]
    result.message = (f"round {round_}: zeroed {zeroed} groups in {sum(e.zeros_after > e.zeros_before for e in entries)}"
                      f"/{len(entries)} layers; sparsity {result.sparsity:.2%} of eligible weights"
                      + (f"; {len(blocked)} layers limited by constraints" if blocked else "")
                      + (f"; {describe_regroup(regroup_meta['regroup'])}" if regroup_meta else "")
                      + (f"; {describe_permutation(permute_meta['permutation'])}" if permute_meta else ""))
    return result


def describe_permutation(record: dict) -> str:
    from sparsify.rounds.permute import describe_permutation as describe

    return describe(record)


def taylor_saliency(config: RunConfig, loaded: LoadedRun, masks: dict, pattern) -> dict[str, torch.Tensor]:
    """Criterion taylor: |w * dL/dw| over `criterion_batches` training batches, with the masks applied."""
    from sparsify.core.criteria import accumulate_taylor

    meta = loaded.checkpoint.meta
    device = resolve_device(config.device)
    train_loader, _ = checkpoint_loaders(config, meta, seed=config.seed + meta["round"] + 1, pin_memory=False)
    model = loaded.model.to(device)
    MaskEnforcer(model, masks, pattern).apply_()
    try:
        return accumulate_taylor(model, train_loader, names=list(masks), limit=config.sparsity.criterion_batches,
                                 device=device)
    finally:
        loaded.model.cpu()


def _target_message(entries, target: float, *, scope: str = "layer") -> str:
    stuck = [e for e in entries if e.zeros_before < e.target_zeros]
    if scope == "global":
        return (f"nothing left to prune: the eligible weights reached the model-wide target ({target:.0%}) "
                "or the constraints hold the rest; see `sparsify report`")
    if not stuck:
        return f"every eligible layer is at its target ({target:.0%}); nothing left to prune"
    return (f"no more groups can be pruned: {len(entries) - len(stuck)} layers are at the target and "
            f"{len(stuck)} are held by the constraints (e.g. {stuck[0].name}); see `sparsify report`")


def train(config: RunConfig, *, epochs: int | None = None, stage: str = "trained", command: str = "train") -> StageResult:
    """Finetune the latest checkpoint with masks enforced, evaluate, save (on every torchrun rank)."""
    from sparsify.training.distributed import distributed_session, main_holds, run_on_main
    from sparsify.training.stage import finetune

    with distributed_session(config.device) as (info, device):
        run = RunDir(config.run_dir)
        with main_holds(run.lock(command)):
            started = time.perf_counter()
            loaded = load_run(run)
            meta = loaded.checkpoint.meta
            check_same_run(config, meta)
            n_epochs = epochs or config.train.epochs
            log(f"{command}: round {meta['round']}, {n_epochs} epoch(s) on {device}"
                f"{f' x {info.world_size} processes' if info.active else ''}, {len(loaded.masks)} masked layers, "
                f"{torch.get_num_threads()} CPU thread(s)")
            callbacks = callbacks_for(config, loaded.model, parent_meta=meta, extra={
                "trainable": config.train.trainable, "parent_tensors": loaded.checkpoint.extra})
            callbacks += activation_callbacks(config.activations, seed=config.seed)
            callbacks += rewind_callbacks(config, run, loaded.checkpoint)  # rewind: {epoch: E} saves in round 0
            make_loaders = partial(checkpoint_loaders, config, meta, pin_memory=device.type == "cuda",
                                   rank=info.rank, world_size=info.world_size)
            with forgets_rows_if_failed(run, loaded.checkpoint, main=info.is_main):
                done = finetune(config, run, loaded, make_loaders=make_loaders, epochs=n_epochs, device=device,
                                info=info, log=log, callbacks=callbacks)
                metrics = {k: round(v, 4) for k, v in done.metrics.items()}
                metrics["epochs"] = n_epochs
                result = run_on_main(write_trained, run, config, command=command, parent=loaded.checkpoint,
                                     done=done, metrics=metrics, stage=stage, started=started,
                                     extra_meta=stage_meta(callbacks), extra_tensors=stage_tensors(callbacks))
    result.message = (f"round {result.round} {stage}: val top-1 {metrics['val_acc1']:.2f}%, "
                      f"top-5 {metrics['val_acc5']:.2f}%, sparsity {result.sparsity:.2%}")
    return result


@contextmanager
def forgets_rows_if_failed(run: RunDir, start: Checkpoint, *, main: bool):
    """A train stage that fails leaves metrics.csv as it found it, but for the rows a train-state covers.

    The next attempt starts the stage again (or resumes it from the train-state, whose rows stay);
    a file the failed stage created and left without rows is removed.
    """
    from sparsify.training.stage import METRICS_CSV

    csv_path = run.root / METRICS_CSV
    existed = csv_path.is_file()
    try:
        yield
    except BaseException:
        if main and csv_path.is_file():
            from sparsify.training.log import drop_rows_after, read_rows

            drop_rows_after(csv_path, start=start.path.name, step=resumable_step(run, start))
            if not existed and not read_rows(csv_path):
                csv_path.unlink()
        raise


def resumable_step(run: RunDir, start: Checkpoint) -> int:
    """The step of the train-state a rerun of the stage from `start` may resume from (0: none)."""
    import json

    from sparsify.io.checkpoint import read_metadata
    from sparsify.training.stage import TRAIN_STATE

    path = run.root / TRAIN_STATE
    if not path.is_file():
        return 0
    try:
        meta = {key: json.loads(value) for key, value in read_metadata(path).items()}
    except Exception:  # a damaged train-state resumes nothing
        return 0
    if (meta.get("start_checkpoint"), meta.get("start_sha256")) != (start.path.name, start.sha256):
        return 0
    return int(meta.get("step") or 0)


def write_trained(run: RunDir, config: RunConfig, *, command: str, parent: Checkpoint, done, metrics: dict,
                  stage: str, started: float, extra_meta: dict | None = None,
                  extra_tensors: dict | None = None) -> StageResult:
    """Rank 0: the trained checkpoint (with the masks training ended with), then drop the train-state."""
    from sparsify.training.stage import TRAIN_STATE

    result = write_stage(run, config, command=command, parent=parent, model=done.model, masks=done.masks,
                         round_=parent.meta["round"], stage=stage, metrics=metrics, started=started,
                         extra_meta=extra_meta, extra_tensors=extra_tensors)
    save_resolved_config(run, config)  # only a stage that succeeded changes the run's config.yaml
    (run.root / TRAIN_STATE).unlink(missing_ok=True)
    return result


def eval_latest(config: RunConfig) -> StageResult:
    """Evaluate the latest checkpoint on the validation set (no new checkpoint)."""
    run = RunDir(config.run_dir)
    with run.lock("eval"):
        started = time.perf_counter()
        loaded = load_run(run)
        meta = loaded.checkpoint.meta
        device = resolve_device(config.device)
        _, val_loader = checkpoint_loaders(config, meta, seed=config.seed, pin_memory=device.type == "cuda")
        for sites in activation_callbacks(config.activations, seed=config.seed):  # masks are not in checkpoints
            sites.prepare(loaded.model)
        metrics = {k: round(v, 4) for k, v in evaluate(loaded.model.to(device), val_loader, device=device,
                                                       limit=config.data.limit_val_batches).items()}
        sparsity = model_sparsity(loaded.checkpoint.state, loaded.masks, loaded.pattern)
        seconds = time.perf_counter() - started
        run.append_history({"time": now(), "command": "eval", "round": meta["round"], "stage": "eval",
                            "checkpoint": loaded.checkpoint.path.name, "sha256": loaded.checkpoint.sha256,
                            "sparsity": round(sparsity, 6), "metrics": metrics, "seconds": round(seconds, 3)})
    result = StageResult("eval", meta["round"], "eval", loaded.checkpoint.path, sparsity, metrics, seconds)
    result.message = (f"{loaded.checkpoint.path.name}: val top-1 {metrics['val_acc1']:.2f}%, "
                      f"top-5 {metrics['val_acc5']:.2f}%, loss {metrics['val_loss']:.4f}, sparsity {sparsity:.2%}")
    return result


def next_step(run: RunDir, config: RunConfig) -> str:
    """What `run` does next, from the latest finished stage: download, dense, prune, round, final, done."""
    latest = run.latest()
    if latest is None:
        return "download"
    stage = _stage_of(latest)
    sched = config.schedule
    if not METHODS.get(config.sparsity.method).prune_rounds:  # training sets the masks: one stage
        return "done" if stage == "final" else "train"
    if stage == "pretrained":
        return "dense" if sched.dense_epochs > 0 else "prune"
    if stage == "pruned":
        return "round" if sched.epochs_per_round > 0 else "prune"
    if stage == "final":
        return "done"
    return "prune"


def _stage_of(path: Path) -> str:
    return path.name.split("-", 2)[2].removesuffix(".safetensors")


def run_schedule(config: RunConfig, *, echo=log) -> list[StageResult]:
    """The whole schedule in one process (or one torchrun job); resumable from the last finished stage."""
    from sparsify.training.distributed import distributed_session

    with distributed_session(config.device):
        return schedule_stages(config, echo=echo)


def schedule_stages(config: RunConfig, *, echo=log) -> list[StageResult]:
    """The loop of `run_schedule`: download and prune on rank 0 only, train on every rank."""
    from sparsify.training.distributed import run_on_main

    results: list[StageResult] = []
    run = RunDir(config.run_dir)
    sched = config.schedule
    for _ in range(2 * sched.max_rounds + 4):
        step = next_step(run, config)
        if step == "done":
            return results
        if step == "download":
            result = run_on_main(download, config)
        elif step == "train":
            result = train(config, stage="final", command="run")
        elif step == "dense":
            result = train(config, epochs=sched.dense_epochs, command="run")
        elif step == "round":
            result = train(config, epochs=sched.epochs_per_round, command="run")
        else:
            try:
                result = run_on_main(prune, config)
            except TargetReached as reached:
                echo(f"target reached: {reached}")
                if sched.final_epochs == 0:
                    return results
                result = train(config, epochs=sched.final_epochs, stage="final", command="run")
        echo(result.message or f"{result.command}: {result.checkpoint}")
        results.append(result)
    raise SparsifyError(f"schedule.max_rounds ({sched.max_rounds}) reached before the target; raise it or the step")
