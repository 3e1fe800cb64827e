"""`sparsify report`: per-layer sparsity, the model summary and the round history.

`build_report` gathers plain data (dicts and lists, JSON-ready); `render` prints it as a rich
table, JSON, CSV (the per-layer table) or Markdown.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from sparsify.io.checkpoint import RunDir, load_checkpoint
from sparsify.errors import SparsifyError
from sparsify.core.patterns import build_pattern, describe_pattern
from sparsify.core.prune import find_layers

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
    raise SparsifyError(f"{target} is neither a run folder nor a checkpoint file")


def build_report(target: Path) -> dict:
    """Everything `render` prints, as JSON-ready data."""
    from sparsify.io.restore import build_model_for

    path, run = locate(target)
    ckpt = load_checkpoint(path, expected_sha256=run.recorded_sha256(path) if run else None)
    meta = ckpt.meta
    with torch.device("meta"):
        model = build_model_for(meta)
    pattern = build_pattern(meta["pattern"])
    sparsity_cfg = meta.get("sparsity_config") or {}
    layers = find_layers(model, pattern, include_linear=sparsity_cfg.get("include_linear", False),
                         exclude=sparsity_cfg.get("exclude", []))
    rows = [layer_row(layer, ckpt.state[layer.name], ckpt.masks.get(layer.name), meta) for layer in layers]
    return {
        "checkpoint": str(path), "arch": meta["arch"], "round": meta["round"], "stage": meta["stage"],
        "pattern": describe_pattern(meta["pattern"]), "criterion": meta.get("criterion"), "target": meta.get("target"),
        "layers": rows,
        "summary": summarize(model, ckpt.state, ckpt.masks, rows, pattern=pattern),
        **dst_breakdown(meta, ckpt.state, ckpt.masks, pattern, order=[layer.name for layer in layers]),
        "constraints": [{"parameter": e[0], "note": e[5]} for e in meta.get("prune_log", []) if e[5]],
        "regroup": regroup_rows(meta),
        "history": [history_row(e) for e in run.history()] if run else [],
        "rounds": round_curves(run) if run else [],
        "permutation": meta.get("permutation"),
        "activations": activation_rows(meta),
    }


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


def layer_row(layer, weight: torch.Tensor, mask: torch.Tensor | None, meta: dict) -> dict:
    changes = {e[0]: e for e in meta.get("prune_log", [])}
    zeros = int((weight == 0).sum())
    row = {
        "parameter": layer.name, "shape": "x".join(map(str, layer.shape)),
        "pattern": describe_pattern(meta["pattern"]) if mask is not None else "-",
        "groups_kept": int(mask.sum()) if mask is not None else None,
        "groups": int(mask.numel()) if mask is not None else None,
        "sparsity": round(zeros / weight.numel(), 6),
        "change": None,
        "eligible": "yes" if layer.reason is None else f"no: {layer.reason}",
    }
    if layer.name in changes:
        _, groups, before, after, _, _ = changes[layer.name]
        row["change"] = round((after - before) / groups, 6)
    return row


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


# ---------------------------------------------------------------- rendering


def render(report: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":
        return render_csv(report["layers"], LAYER_COLUMNS)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "table":
        return render_table(report)
    raise SparsifyError(f"unknown report format {fmt!r}; choose table, json, csv or markdown")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _display_layers(report: dict) -> list[list[str]]:
    return [[r["parameter"], r["shape"], r["pattern"],
             "" if r["groups"] is None else f"{r['groups_kept']}/{r['groups']}",
             _pct(r["sparsity"]), "" if r["change"] is None else f"+{_pct(r['change'])}", r["eligible"]]
            for r in report["layers"]]


def _display_history(report: dict) -> list[list[str]]:
    return [[_cell(h["round"]), _cell(h["stage"]), _cell(h["command"]), _pct(h["sparsity"]),
             _cell(h["val_acc1"]), _cell(h["val_acc5"]), _cell(h["seconds"]), _cell(h["time"])]
            for h in report["history"]]


_LAYER_HEAD = ["parameter", "shape", "pattern", "groups kept", "sparsity", "change (groups)", "eligible"]
_HISTORY_HEAD = ["round", "stage", "command", "sparsity", "top-1", "top-5", "seconds", "time"]


def _title(report: dict) -> str:
    return (f"{report['arch']} — {Path(report['checkpoint']).name} (round {report['round']}, {report['stage']}); "
            f"pattern {report['pattern']}, criterion {report['criterion']}, target {report['target']}")


_ROUNDS_HEAD = ["round", "epochs", "first_loss", "last_loss", "val_acc1"]


def round_curves(run: RunDir) -> list[dict]:
    """Per round: epochs trained, first and last logged train loss, last val top-1."""
    from sparsify.training.log import read_rows

    rows: dict[int, dict] = {}
    for row in read_rows(run.root / "metrics.csv"):
        entry = rows.setdefault(int(row["round"]), {"round": int(row["round"]), "epochs": 0,
                                                   "first_loss": float(row["loss"]), "val_acc1": None})
        entry["last_loss"] = float(row["loss"])
    for entry in run.history():
        if entry.get("round") in rows and entry.get("stage") in ("trained", "final"):
            rows[entry["round"]]["epochs"] += (entry.get("metrics") or {}).get("epochs", 0)
            rows[entry["round"]]["val_acc1"] = (entry.get("metrics") or {}).get("val_acc1")
    return [rows[key] for key in sorted(rows)]


def render_table(report: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None)
    layers = Table(title=_title(report), title_justify="left")
    for head in _LAYER_HEAD:
        layers.add_column(head, justify="left" if head in ("parameter", "eligible", "pattern") else "right")
    for row in _display_layers(report):
        layers.add_row(*row)
    console.print(layers)
    summary = Table(title="summary (sparsity = zeros over all parameters)", title_justify="left")
    for key in report["summary"]:
        summary.add_column(key, justify="right")
    summary.add_row(*[_cell(v) for v in report["summary"].values()])
    console.print(summary)
    if report.get("tensors"):
        tensors = Table(title="sparse tensors (dst breakdown)", title_justify="left")
        for head in TENSOR_COLUMNS:
            tensors.add_column(head, justify="left" if head == "Parameter tensor" else "right")
        for row in report["tensors"]:
            tensors.add_row(*[_cell(v) for v in row.values()])
        console.print(tensors)
    if report.get("activations"):
        sites = Table(title="activation density (evaluation)", title_justify="left")
        for head in ("site", "kind", "quarters", "mask_density", "measured_density"):
            sites.add_column(head, justify="left" if head in ("site", "kind") else "right")
        for row in report["activations"]:
            sites.add_row(*[_cell(row[k]) for k in ("site", "kind", "quarters", "mask_density", "measured_density")])
        console.print(sites)
    if report.get("regroup"):
        blocks = Table(title="regroup (this round)", title_justify="left", caption=REGROUP_NOTE)
        for head in REGROUP_COLUMNS:
            blocks.add_column(head, justify="left" if head in ("parameter", "block_sizes") else "right")
        for row in report["regroup"]:
            blocks.add_row(*[_cell(row[k]) for k in REGROUP_COLUMNS])
        console.print(blocks)
    for item in report["constraints"]:
        console.print(f"constraint: {item['parameter']}: {item['note']}")
    for line in permutation_lines(report.get("permutation")):
        console.print(line)
    if report["history"]:
        history = Table(title="history", title_justify="left")
        for head in _HISTORY_HEAD:
            history.add_column(head, justify="right")
        for row in _display_history(report):
            history.add_row(*row)
        console.print(history)
    if report.get("rounds"):
        curves = Table(title="training per round (metrics.csv)", title_justify="left")
        for head in _ROUNDS_HEAD:
            curves.add_column(head, justify="right")
        for row in report["rounds"]:
            curves.add_row(*[_cell(row[key]) for key in _ROUNDS_HEAD])
        console.print(curves)
    return buffer.getvalue().rstrip()


def render_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in columns})
    return buffer.getvalue().rstrip()


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    parts = [f"**{_title(report)}**", "", _markdown_table(_LAYER_HEAD, _display_layers(report)), "",
             _markdown_table(list(report["summary"]), [[_cell(v) for v in report["summary"].values()]])]
    if report.get("tensors"):
        parts += ["", _markdown_table(TENSOR_COLUMNS, [[_cell(v) for v in r.values()] for r in report["tensors"]])]
    if report.get("regroup"):
        rows = [[_cell(r[k]) for k in REGROUP_COLUMNS] for r in report["regroup"]]
        parts += ["", _markdown_table(REGROUP_COLUMNS, rows), "", REGROUP_NOTE]
    if report["history"]:
        parts += ["", _markdown_table(_HISTORY_HEAD, _display_history(report))]
    return "\n".join(parts)


def permutation_lines(record: dict | None) -> list[str]:
    """'permutation: N/M layers permuted ...' and one line per eligible layer (gain or the reason)."""
    if not record:
        return []
    from sparsify.rounds.permute import describe_permutation

    lines = [f"permutation: {describe_permutation(record)}"]
    for name, entry in record["layers"].items():
        if entry["permuted"]:
            lines.append(f"  {name}: kept magnitude {entry['kept_before']:.4g} -> {entry['kept_after']:.4g} "
                         f"({100 * entry['gain']:+.3f}%, {entry['siblings']} siblings)")
        else:
            lines.append(f"  {name}: not permuted ({entry['reason']})")
    return lines
