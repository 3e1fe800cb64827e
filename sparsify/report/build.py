"""`sparsify report`: per-layer sparsity, the model summary and the round history.

`build_report` gathers plain data (dicts and lists, JSON-ready); `render` prints it as a rich
table, JSON, CSV (the per-layer table) or Markdown.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sparsify.core.patterns import build_pattern, describe_pattern
from sparsify.core.prune import find_layers
from sparsify.errors import CheckpointError, SparsifyError
from sparsify.io.checkpoint import load_checkpoint
from sparsify.io.rundir import RunDir
from sparsify.report.bench import bench_summary

LAYER_COLUMNS = ["parameter", "shape", "pattern", "groups_kept", "groups", "sparsity", "change", "eligible"]
SUMMARY_COLUMNS = ["# total parameters", "# sparse parameters", "# dense parameters",
                   "# nonzero parameters in sparse", "# free parameters", "sparsity"]
TENSOR_COLUMNS = ["Parameter tensor", "# total", "# nonzero", "sparsity"]  # dst's per-tensor table
HISTORY_COLUMNS = ["round", "stage", "command", "sparsity", "val_acc1", "val_acc5", "seconds", "time", "checkpoint"]


def locate(target: Path) -> tuple[Path, RunDir | None]:
    """The checkpoint to report on and, when it lives in a run folder, that run."""
    target = Path(target)
    if target.is_dir():
        run = RunDir(target)
        latest = run.latest()
        if latest is None:
            raise SparsifyError(f"{target} has no checkpoint; run `sparsify download` first or pass a checkpoint file")
        return latest, run
    if target.is_file():
        run_root = target.parent.parent
        return target, RunDir(run_root) if (run_root / "history.jsonl").is_file() else None
    if target.exists():
        raise SparsifyError(f"{target} is neither a run folder nor a checkpoint file; give one of those")
    raise SparsifyError(f"{target} does not exist: give a run folder or a checkpoint file (relative paths, and "
                        "runs_dir, are from the current folder), or start the run with `sparsify download`")


def build_report(target: Path) -> dict:
    """Everything `render` prints, as JSON-ready data."""
    from sparsify.io.restore import build_model_for, require_fit
    from sparsify.models.tvmodels import build_for_shapes

    path, run = locate(target)
    ckpt = load_checkpoint(path, expected_sha256=run.recorded_sha256(path, lenient=True) if run else None)
    history, problems = run.readable_history() if run else ([], [])
    curves, more = round_curves(run, history) if run else ([], [])
    meta = ckpt.meta
    require_report_metadata(meta, path)
    # meta device, CPU where the builder needs values
    model = build_for_shapes(lambda: build_model_for(meta, source=path))
    require_fit(ckpt, model)
    pattern = build_pattern(meta["pattern"])
    sparsity_cfg = meta.get("sparsity_config") or {}
    layers = find_layers(model, pattern, include_linear=sparsity_cfg.get("include_linear", False),
                         exclude=sparsity_cfg.get("exclude", []))
    layers = with_channel_reasons(layers, meta)
    rows = [layer_row(layer, ckpt.state[layer.name], ckpt.masks.get(layer.name), meta) for layer in layers]
    report = {
        "checkpoint": str(path), "arch": meta["arch"], "round": meta["round"], "stage": meta["stage"],
        "pattern": describe_pattern(meta["pattern"]), "criterion": meta.get("criterion"), "target": meta.get("target"),
        "layers": rows,
        "summary": summarize(model, ckpt.state, ckpt.masks, rows, pattern=pattern),
        **dst_breakdown(meta, ckpt.state, ckpt.masks, pattern, order=[layer.name for layer in layers]),
        "constraints": [{"parameter": e["name"], "note": e["note"]} for e in prune_log(meta) if e["note"]],
        "regroup": regroup_rows(meta),
        "history": [history_row(e) for e in history],
        "rounds": curves,
        "problems": problems + more,  # side files a report could not read in full
        "permutation": meta.get("permutation"),
        "bn_recalibration": meta.get("bn_recalibration"),  # a pruned checkpoint's BatchNorm re-estimation
        "activations": activation_rows(meta),
        "bench": bench_summary(run.root) if run else None,  # the run's latest `sparsify bench`
        "compaction": compaction_record(ckpt) if pattern.name == "channel" else None,
        "channel_macs": meta.get("channel_macs"),  # pattern channel, scope global: the multiply-adds target
    }
    report["outcome"] = outcome(report, run, path, meta)
    return report


REPORT_METADATA = {"round": int, "stage": str, "pattern": dict}  # beyond what builds the model


def require_report_metadata(meta: dict, path: Path) -> None:
    """CheckpointError naming the first metadata key the report needs that is missing or of another type."""
    for key, kind in REPORT_METADATA.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path} has {key} {value!r} in its metadata, not a {kind.__name__}; it was not "
                                  "written by sparsify or was altered: report a checkpoint from the run's checkpoints/")


def compaction_record(ckpt) -> dict:
    """Pattern channel: parameters and multiply-adds before and after `export --compact`, per layer and in total."""
    from sparsify.io.restore import rebuild
    from sparsify.stages.costs import compaction_costs

    meta = ckpt.meta
    size = meta.get("input_size") or 224
    example = torch.randn(2, meta["in_channels"], size, size, generator=torch.Generator().manual_seed(0))
    return compaction_costs(rebuild(ckpt).model.eval(), example)[1]


def activation_rows(meta: dict) -> list[dict]:
    """Activation density per site, as the train stage measured it in evaluation ([] without sites)."""
    found = (meta.get("method_state") or {}).get("activations") or {}
    return [{"site": name, **values} for name, values in found.items()]


REGROUP_COLUMNS = ["parameter", "blocks", "block_sizes", "density_before", "density_after", "added", "removed"]
REGROUP_NOTE = ("regroup turns each pruned mask into dense row x column blocks: it adds weights inside blocks "
                "that the prune had zeroed and removes those outside every block")


def regroup_rows(meta: dict) -> list[dict]:
    """Per layer of the round's regroup: blocks, their (rows, columns), density before/after ([] without)."""
    layers = (meta.get("regroup") or {}).get("layers", [])
    return [{**{k: row.get(k) for k in REGROUP_COLUMNS},
             "block_sizes": " ".join(f"{r}x{c}" for r, c in row.get("block_sizes", [])) or row.get("note", "")}
            for row in layers]


def with_channel_reasons(layers: list, meta: dict) -> list:
    """Pattern channel: the layers the channel graph left alone carry its reason (checkpoint metadata)."""
    skipped = (meta.get("channel_groups") or {}).get("skipped") or {}
    return [dataclasses.replace(layer, reason=skipped[layer.name]) if layer.reason is None and layer.name in skipped
            else layer for layer in layers]


def layer_row(layer, weight: torch.Tensor, mask: torch.Tensor | None, meta: dict) -> dict:
    changes = {e["name"]: e for e in prune_log(meta)}
    zeros = int((weight == 0).sum())
    row = {
        "parameter": layer.name, "shape": "x".join(map(str, layer.shape)),
        "pattern": describe_pattern(meta["pattern"]) if mask is not None else "-",
        "groups_kept": int(mask.sum()) if mask is not None else None,
        "groups": int(mask.numel()) if mask is not None else None,
        "sparsity": round(zeros / weight.numel(), 6),
        "change": None,
        "eligible": "yes" if layer.reason is None else f"no: {layer.reason}",
        "target": (meta.get("layer_targets") or {}).get(layer.name),  # the layer's own target, if the run set them
    }
    if layer.name in changes:
        change = changes[layer.name]
        row["change"] = round((change["zeros_after"] - change["zeros_before"]) / change["groups"], 6)
    return row


PRUNE_LOG_FIELDS = ("name", "groups", "zeros_before", "zeros_after", "target_zeros", "note")


def prune_log(meta: dict) -> list[dict]:
    """The round's per-layer prune records as dicts (checkpoints before named fields stored lists)."""
    return [dict(zip(PRUNE_LOG_FIELDS, e)) if isinstance(e, list) else e for e in meta.get("prune_log", [])]


def summarize(model, state: dict, masks: dict, rows: list[dict], *, pattern) -> dict:
    """The dst summary (nonzero = weights the masks keep; sparsity = zeros over all parameters), plus 'N/M layers pruned'."""
    total = sum(p.numel() for p in model.parameters())
    sparse = sum(state[name].numel() for name in masks)
    nonzero = sum(kept_weights(state[name], mask, pattern) for name, mask in masks.items())
    eligible = sum(r["eligible"] == "yes" for r in rows)
    pruned = sum(1 for name, mask in masks.items() if not bool(mask.all()))
    return {
        "# total parameters": total, "# sparse parameters": sparse, "# dense parameters": total - sparse,
        "# nonzero parameters in sparse": nonzero, "# free parameters": total - sparse + nonzero,
        "sparsity": round((sparse - nonzero) / total, 6) if total else 0.0,
        "sparsity of eligible weights": round(1 - nonzero / sparse, 6) if sparse else 0.0,
        "layers pruned": f"{pruned}/{eligible}",
    }


def kept_weights(weight: torch.Tensor, mask: torch.Tensor, pattern) -> int:
    """Weights inside the groups `mask` keeps (the dst count of nonzero parameters)."""
    return int(pattern.group_sizes(tuple(weight.shape))[mask].sum())


def dst_breakdown(meta: dict, state: dict, masks: dict, pattern, *, order: list[str]) -> dict:
    """For dsr runs, the dst per-tensor table: {'tensors': rows}; {} for other methods."""
    if (meta.get("sparsity_config") or {}).get("method") != "dsr":
        return {}
    rows = []
    for name in [n for n in order if n in masks]:
        total, nonzero = state[name].numel(), kept_weights(state[name], masks[name], pattern)
        rows.append(dict(zip(TENSOR_COLUMNS, [name, total, nonzero, round(1 - nonzero / total, 6)])))
    return {"tensors": rows}


def history_row(entry: dict) -> dict:
    metrics = entry.get("metrics") or {}
    return {
        "round": entry.get("round"), "stage": entry.get("stage"), "command": entry.get("command"),
        "sparsity": entry.get("sparsity"), "val_acc1": metrics.get("val_acc1"), "val_acc5": metrics.get("val_acc5"),
        "seconds": entry.get("seconds"), "time": entry.get("time"), "checkpoint": entry.get("checkpoint"),
    }


def outcome(report: dict, run: RunDir | None, path: Path, meta: dict) -> dict:
    """The reported checkpoint's sparsity and top-1, and the dense model's top-1 (None when not evaluated).

    top-1: the last history line of this checkpoint with a val_acc1, else its own metadata. Dense: the
    last evaluated history line of a model with no zero group (the dense training of round 0, or an
    eval of a dense checkpoint).
    """
    def top1(entry: dict):
        return (entry.get("metrics") or {}).get("val_acc1")

    history = run.readable_history()[0] if run else []
    mine = [top1(e) for e in history if e.get("checkpoint") == path.name and top1(e) is not None]
    dense = [top1(e) for e in history if e.get("sparsity") == 0 and top1(e) is not None]
    latest = run.latest() if run else None
    return {"checkpoint": path.name, "latest": latest is None or latest.name == path.name, "round": meta["round"],
            "sparsity": report["summary"]["sparsity of eligible weights"],
            "val_acc1": mine[-1] if mine else top1(meta), "dense_val_acc1": dense[-1] if dense else None}


def round_curves(run: RunDir, history: list[dict]) -> tuple[list[dict], list[str]]:
    """Per round: epochs trained, first and last logged train loss, last val top-1; and the
    metrics.csv lines that could not be read (skipped, named)."""
    from sparsify.training.log import read_rows

    rows: dict[int, dict] = {}
    bad: list[int] = []
    for number, row in enumerate(read_rows(run.root / "metrics.csv"), 2):  # line 1 is the header
        try:
            round_, loss = int(row["round"]), float(row["loss"]) if row.get("loss") else None
        except (KeyError, TypeError, ValueError):
            bad.append(number)
            continue
        if loss is None:  # fp16 skipped every step of that row's window: no loss to show
            continue
        entry = rows.setdefault(round_, {"round": round_, "epochs": 0, "first_loss": loss, "val_acc1": None})
        entry["last_loss"] = loss
    for entry in history:
        if entry.get("round") in rows and entry.get("stage") in ("trained", "final"):
            rows[entry["round"]]["epochs"] += (entry.get("metrics") or {}).get("epochs", 0)
            rows[entry["round"]]["val_acc1"] = (entry.get("metrics") or {}).get("val_acc1")
    problems = [f"{run.root / 'metrics.csv'} line {bad[0]} is not a metrics row"
                + (f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else "") + "; skipped"] if bad else []
    return [rows[key] for key in sorted(rows)], problems


