"""`sparsify sensitivity`: every eligible layer pruned alone to each level and measured, then the allocation.

For each eligible layer and level, the latest checkpoint's layer is pruned (from its current mask) to
that level in one go with the run's criterion and constraints, BatchNorm is re-estimated when
`sparsity.recalibrate_bn` > 0 (on the same training batches each time), and the model is evaluated
on the first `batches` validation batches; every other layer stays as the checkpoint has it. The
drops are against the unpruned checkpoint on the same batches: `loss_drop` is how much the mean
loss rose, `acc1_drop` how many top-1 points were lost. The result goes to `<run>/sensitivity.json`,
rewritten atomically after each layer; a rerun with the same key (checkpoint, levels, batches,
criterion, ...) keeps the layers measured and measures the rest. Under torchrun the layers are
split over the ranks, one layer per rank at a time; rank 0 writes. No checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsify.config import RunConfig
from sparsify.console import Progress, log
from sparsify.core.allocation import hull_corners, layer_targets
from sparsify.core.criteria import ScoreInputs
from sparsify.core.prune import PruneSettings, prune_layer
from sparsify.errors import SparsifyError
from sparsify.io.restore import load_run
from sparsify.io.rundir import RunDir
from sparsify.io.sensitivity import SENSITIVITY_FILE, curves_of, read_json, write_json
from sparsify.rounds.hooks import ROUND_HOOKS
from sparsify.stages.prune import start_round
from sparsify.stages.run import check_same_run, checkpoint_loaders
from sparsify.training.bn import batchnorm_layers, recalibrate_batchnorm_
from sparsify.training.distributed import distributed_session, fails_together, gather_objects, main_holds, run_on_main

DEFAULT_LEVELS = (0.25, 0.5, 0.75, 0.9)
SCORE_HOOKS = ("saliency", "bn_scales")  # the round hooks that compute what criteria score with


@dataclass(frozen=True, kw_only=True)
class ScanSettings:
    """What `sparsify sensitivity` measures: the levels each layer is pruned to, on how many validation batches."""

    levels: tuple[float, ...] = DEFAULT_LEVELS
    batches: int = 8


@dataclass
class Scan:
    """One rank's view of the scan: the model, its starting state, the batches and the pruning settings."""

    model: nn.Module
    state: dict[str, torch.Tensor]  # the checkpoint's state, put back after each level
    masks: dict[str, torch.Tensor]  # every eligible layer's mask going in
    settings: PruneSettings
    inputs: dict[str, ScoreInputs]
    levels: tuple[float, ...]
    val_batches: list
    bn_batches: list
    device: torch.device


def check_levels(text: str) -> tuple[float, ...]:
    """`0.25,0.5` -> (0.25, 0.5), sorted; one line when a level is not a number in (0, 1)."""
    try:
        levels = sorted({float(part) for part in text.split(",")})
    except ValueError:
        levels = []
    if not levels or not all(0.0 < level < 1.0 for level in levels):
        raise SparsifyError(f"--levels {text!r} is not a list of levels; give shares in (0, 1), comma-separated, "
                            "e.g. --levels 0.25,0.5,0.75,0.9")
    return tuple(levels)


def sensitivity(config: RunConfig, settings: ScanSettings) -> dict:
    """Measure every eligible layer of the run's latest checkpoint (the layers not in sensitivity.json yet),
    write sensitivity.json after each, and add the allocation; returns the file's content."""
    with distributed_session(config.device) as (info, device):
        run = RunDir(config.run_dir)
        with main_holds(run.lock("sensitivity")):
            with fails_together():  # every rank loads the checkpoint and its batches
                loaded = load_run(run)
                check_same_run(config, loaded.checkpoint.meta)
                scan = prepare_scan(config, run, loaded, settings, device)
            key = scan_key(config, loaded.checkpoint, scan.levels, len(scan.val_batches))
            data = run_on_main(starting_data, run.root / SENSITIVITY_FILE, key, list(scan.masks), scan)
            todo = [name for name in scan.masks if name not in {e["layer"] for e in data["layers"]}]
            log(scan_line(scan, before=len(data["layers"]), processes=info.world_size))
            with Progress("sensitivity", total=len(scan.masks), done=len(data["layers"])) as bar:
                for start in range(0, len(todo), info.world_size):
                    mine = todo[start + info.rank] if start + info.rank < len(todo) else None
                    with fails_together():
                        entry = measure_layer(scan, mine, data["baseline"]) if mine else None
                    found = [e for e in gather_objects(entry) if e is not None]
                    data = run_on_main(record_layers, run.root / SENSITIVITY_FILE, data, found, list(scan.masks))
                    bar.advance(len(found), found[-1]["layer"])
            data = run_on_main(record_allocation, run.root / SENSITIVITY_FILE, data, config, scan)
    return data


def scan_line(scan: Scan, *, before: int, processes: int) -> str:
    """What the scan is about to do, for the log."""
    return (f"sensitivity: {len(scan.masks)} eligible layers x levels {list(scan.levels)} on "
            f"{len(scan.val_batches)} validation batch(es)" + (f", {before} measured before" if before else "")
            + (f", {processes} processes" if processes > 1 else ""))


def prepare_scan(config: RunConfig, run: RunDir, loaded, settings: ScanSettings, device: torch.device) -> Scan:
    """The eligible layers' masks, the criterion's inputs (Taylor gradients, BatchNorm scales) and the batches."""
    s = config.sparsity
    round_ = start_round(config, run, loaded)
    for hook in ROUND_HOOKS:
        if hook.name in SCORE_HOOKS and hook.active(s):
            hook.before_scores(round_)
    levels = settings.levels
    if round_.pattern.one_round:
        levels = (s.target,)
        log(f"sensitivity: pattern {round_.pattern.name} prunes a layer in one round to its own share, "
            f"so each layer is measured at that share only ({s.target:g})")
    number = loaded.checkpoint.meta["round"] + 1
    inputs = {n: ScoreInputs(n, config.seed, number, (round_.taylor or {}).get(n),
                             (round_.channel_scales or {}).get(n)) for n in round_.masks}
    prune_settings = PruneSettings(pattern=round_.pattern, criterion=s.criterion, target=s.target, step=1.0,
                                   step_basis="remaining", keep_rows=s.keep_rows, keep_cols=s.keep_cols,
                                   balanced=s.balanced, scope="layer")
    val_loader = checkpoint_loaders(config, loaded.checkpoint.meta, seed=config.seed, pin_memory=False)[1]
    val_batches = list(itertools.islice(val_loader, settings.batches))
    if not val_batches:
        raise SparsifyError("the validation set is empty; check data.root and data.limit_val_batches")
    wanted = s.recalibrate_bn if batchnorm_layers(round_.model) else 0
    bn_batches = list(itertools.islice(round_.train_batches(), wanted)) if wanted else []
    model = round_.model.to(device).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Scan(model, state, round_.masks, prune_settings, inputs, tuple(levels), val_batches, bn_batches, device)


def scan_key(config: RunConfig, checkpoint, levels: tuple[float, ...], batches: int) -> dict:
    """What the measurements depend on: a sensitivity.json with another key starts fresh."""
    s = config.sparsity
    return {"checkpoint": checkpoint.path.name, "sha256": checkpoint.sha256, "levels": list(levels),
            "batches": batches, "batch_size": config.data.batch_size, "criterion": s.criterion,
            "pattern": s.pattern.model_dump(mode="json"), "recalibrate_bn": s.recalibrate_bn,
            "constraints": {"keep_rows": s.keep_rows, "keep_cols": s.keep_cols, "balanced": s.balanced}}


def starting_data(path: Path, key: dict, eligible: list[str], scan: Scan) -> dict:
    """The previous file's layers when it has the same key (those still eligible), else a fresh start
    with the baseline measured on the scan's batches."""
    previous = read_json(path)
    if isinstance(previous, dict) and previous.get("key") == key and isinstance(previous.get("layers"), list):
        kept = [e for e in previous["layers"] if isinstance(e, dict) and e.get("layer") in eligible]
        return {"key": key, "baseline": previous["baseline"], "layers": kept}
    if previous is not None:
        log(f"sensitivity: {path.name} was measured with other settings or another checkpoint; measuring again")
    return {"key": key, "baseline": evaluate_batches(scan.model, scan.val_batches, scan.device), "layers": []}


def measure_layer(scan: Scan, name: str, baseline: dict) -> dict:
    """Layer `name` pruned alone to each level: its sparsity (share of its weights zero), loss, top-1 and drops."""
    weight = scan.model.get_parameter(name)
    mask = scan.masks[name]
    sizes = scan.settings.pattern.group_sizes(tuple(weight.shape))
    points = []
    for level in scan.levels:
        settings = dataclasses.replace(scan.settings, layer_targets={name: level})
        new_mask, entry = prune_layer(name, weight.detach().cpu(), mask, settings, inputs=scan.inputs[name])
        if entry.zeros_after == entry.zeros_before:
            measured = dict(baseline)  # nothing more to zero at this level: the checkpoint itself
        else:
            measured = measure_pruned(scan, name, new_mask)
        points.append({"level": level, "sparsity": round(float(sizes[~new_mask].sum()) / weight.numel(), 6),
                       "groups_zero": entry.zeros_after, **measured,
                       "loss_drop": round(measured["loss"] - baseline["loss"], 6),
                       "acc1_drop": round(baseline["acc1"] - measured["acc1"], 4)})
    return {"layer": name, "shape": list(weight.shape), "weights": weight.numel(), "groups": entry.groups,
            "levels": points}


def measure_pruned(scan: Scan, name: str, mask: torch.Tensor) -> dict:
    """Loss and top-1 with layer `name` under `mask` (BatchNorm re-estimated); the model is put back after."""
    weight = scan.model.get_parameter(name)
    try:
        with torch.no_grad():
            weight.mul_(scan.settings.pattern.expand(mask, tuple(weight.shape)).to(weight))
        recalibrate_batchnorm_(scan.model, scan.bn_batches, limit=len(scan.bn_batches), device=scan.device)
        return evaluate_batches(scan.model, scan.val_batches, scan.device)
    finally:
        scan.model.load_state_dict(scan.state)


def evaluate_batches(model: nn.Module, batches: list, device: torch.device) -> dict:
    """Mean cross-entropy and top-1 (percent) over `batches`, on this process alone."""
    model.eval()
    loss = correct = seen = 0.0
    with torch.no_grad():
        for images, target in batches:
            logits = model(images.to(device)).float()
            target = target.to(device)
            loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
            seen += len(target)
    return {"loss": round(loss / seen, 6), "acc1": round(100.0 * correct / seen, 4)}


def record_layers(path: Path, data: dict, found: list[dict], eligible: list[str]) -> dict:
    """`data` with the layers just measured, in eligible order, written to `path` atomically."""
    layers = {e["layer"]: e for e in [*data["layers"], *found]}
    data = {**data, "layers": [layers[n] for n in eligible if n in layers]}
    write_json(path, data)
    return data


def record_allocation(path: Path, data: dict, config: RunConfig, scan: Scan) -> dict:
    """`data` with the allocation that meets sparsity.target with the least predicted loss, written to `path`."""
    s = config.sparsity
    if scan.settings.pattern.one_round:
        allocation = {"target": s.target, "note": "one-round patterns keep each layer dense or at the pattern's "
                                                  "share; use sparsity.layers to keep sensitive layers dense"}
    else:
        try:
            allocation = allocation_of(data["layers"], {n: scan.model.get_parameter(n).shape for n in scan.masks},
                                       {n: int(scan.settings.pattern.grid(m).numel()) for n, m in scan.masks.items()},
                                       target=s.target, overrides=s.layers)
        except SparsifyError as exc:
            allocation = {"target": s.target, "note": str(exc)}
    data = {**data, "allocation": allocation}
    write_json(path, data)
    return data


def allocation_of(layers: list[dict], shapes: dict, groups: dict[str, int], *, target: float,
                  overrides: dict[str, float]) -> dict:
    """Per-layer targets from the measured curves (core/allocation.py), the share of weights they zero and
    the loss increase they predict (each layer's curve read at its target)."""
    curves = curves_of(layers)
    shapes = {n: tuple(shape) for n, shape in shapes.items()}
    targets = layer_targets(shapes, groups, target=target, allocation="sensitivity", overrides=overrides,
                            curves=curves)
    weights = {n: math.prod(shape) for n, shape in shapes.items()}
    zeros = sum(math.floor(t * groups[n] + 1e-9) * weights[n] / groups[n] for n, t in targets.items())
    predicted = 0.0
    for name, value in targets.items():
        corners = hull_corners(curves.get(name, []))
        predicted += float(np.interp(value, [x for x, _ in corners], [c for _, c in corners]))
    return {"target": target, "sparsity": round(zeros / sum(weights.values()), 6),
            "predicted_loss_drop": round(predicted, 6), "layers": targets}
