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
    from sparsify.models.tvmodels import build_for_shapes

    path, run = locate(target)
    ckpt = load_checkpoint(path, expected_sha256=run.recorded_sha256(path) if run else None)
    meta = ckpt.meta
    model = build_for_shapes(lambda: build_model_for(meta))  # meta device, CPU where the builder needs values
    pattern = build_pattern(meta["pattern"])
    sparsity_cfg = meta.get("sparsity_config") or {}
    layers = find_layers(model, pattern, include_linear=sparsity_cfg.get("include_linear", False),
                         exclude=sparsity_cfg.get("exclude", []))
    rows = [layer_row(layer, ckpt.state[layer.name], ckpt.masks.get(layer.name), meta) for layer in layers]
    report = {
        "checkpoint": str(path), "arch": meta["arch"], "round": meta["round"], "stage": meta["stage"],
        "pattern": describe_pattern(meta["pattern"]), "criterion": meta.get("criterion"), "target": meta.get("target"),
        "layers": rows,
        "summary": summarize(model, ckpt.state, ckpt.masks, rows, pattern=pattern),
        **dst_breakdown(meta, ckpt.state, ckpt.masks, pattern, order=[layer.name for layer in layers]),
        "constraints": [{"parameter": e["name"], "note": e["note"]} for e in prune_log(meta) if e["note"]],
        "regroup": regroup_rows(meta),
        "history": [history_row(e) for e in run.history()] if run else [],
        "rounds": round_curves(run) if run else [],
        "permutation": meta.get("permutation"),
        "activations": activation_rows(meta),
    }
    report["outcome"] = outcome(report, run, path, meta)
    return report


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


# ---------------------------------------------------------------- rendering
#
# One unit convention for people (table, markdown): sparsity, densities and accuracies are
# percentages with two decimals, losses plain numbers with four, counts integers with thousands
# separators. JSON and CSV keep the raw values (fractions for sparsity, as recorded).


def render(report: dict, fmt: str, *, width: int | None = None) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":
        return render_csv(report["layers"], LAYER_COLUMNS)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "table":
        return render_table(report, width=width)
    raise SparsifyError(f"unknown report format {fmt!r}; choose table, json, csv or markdown")


def output_width() -> int:
    """Columns of the table: $COLUMNS, else the terminal's width, else 80 (pipes, files)."""
    import os
    import sys

    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        from rich.console import Console

        return Console().width
    return 80


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pct(fraction) -> str:
    """A fraction (0.5) as a percentage ('50.00%')."""
    return "" if fraction is None else f"{100 * fraction:.2f}%"


def _pct_points(percent) -> str:
    """A value already in percent (val_acc1 98.8889) as '98.89%'."""
    return "" if percent is None else f"{percent:.2f}%"


def _loss(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _when(iso: str | None) -> str:
    """'2026-11-22T15:34:10+00:00' as '11-22 15:34' (UTC; the full time is in --format json)."""
    return "" if not iso else iso[5:16].replace("T", " ")


_LAYER_HEAD = ["parameter", "shape", "groups\nkept", "sparsity", "this\nround", "eligible"]
_HISTORY_HEAD = ["round", "stage", "command", "sparsity", "top-1", "top-5", "seconds", "time (UTC)"]
_ROUNDS_HEAD = ["round", "epochs", "first loss", "last loss", "top-1"]
_TENSOR_HEAD = ["parameter tensor", "# total", "# nonzero", "sparsity"]
_ACTIVATION_HEAD = ["site", "kind", "quarters", "mask\ndensity", "measured\ndensity"]
_REGROUP_HEAD = ["parameter", "blocks", "block sizes", "density\nbefore", "density\nafter", "added", "removed"]
_LAYER_NOTE = ("sparsity: zeroed weights of the layer; this round: share of its groups zeroed by this "
               "checkpoint's prune round")


def _display_layers(report: dict) -> tuple[list[list[str]], list[str]]:
    """The layer rows, with 'no (k)' for an ineligible layer, and the numbered reasons ('(k) reason')."""
    reasons: dict[str, int] = {}
    rows = []
    for r in report["layers"]:
        eligible = r["eligible"]
        if eligible.startswith("no: "):
            number = reasons.setdefault(eligible[4:], len(reasons) + 1)
            eligible = f"no ({number})"
        rows.append([r["parameter"], r["shape"],
                     "" if r["groups"] is None else f"{r['groups_kept']}/{r['groups']}",
                     _pct(r["sparsity"]), "" if r["change"] is None else f"+{_pct(r['change'])}", eligible])
    return rows, [f"({number}) {reason}" for reason, number in reasons.items()]


def _display_summary(report: dict) -> list[list[str]]:
    labels = {"sparsity": "sparsity (zeros over all parameters)"}
    rows = []
    for key, value in report["summary"].items():
        shown = _pct(value) if key.startswith("sparsity") else _cell(value)
        rows.append([labels.get(key, key), shown])
    return rows


def _display_history(report: dict) -> list[list[str]]:
    return [[_cell(h["round"]), _cell(h["stage"]), _cell(h["command"]), _pct(h["sparsity"]),
             _pct_points(h["val_acc1"]), _pct_points(h["val_acc5"]),
             "" if h["seconds"] is None else f"{h['seconds']:.1f}", _when(h["time"])]
            for h in report["history"]]


def _display_rounds(report: dict) -> list[list[str]]:
    return [[_cell(r["round"]), _cell(r["epochs"]), _loss(r["first_loss"]), _loss(r.get("last_loss")),
             _pct_points(r["val_acc1"])] for r in report.get("rounds", [])]


def _display_tensors(report: dict) -> list[list[str]]:
    return [[r["Parameter tensor"], _cell(r["# total"]), _cell(r["# nonzero"]), _pct(r["sparsity"])]
            for r in report.get("tensors", [])]


def _display_activations(report: dict) -> list[list[str]]:
    return [[_cell(r.get("site")), _cell(r.get("kind")), _cell(r.get("quarters")), _pct(r.get("mask_density")),
             _pct(r.get("measured_density"))] for r in report.get("activations", [])]


def _display_regroup(report: dict) -> list[list[str]]:
    return [[_cell(r["parameter"]), _cell(r["blocks"]), _cell(r["block_sizes"]), _pct(r["density_before"]),
             _pct(r["density_after"]), _cell(r["added"]), _cell(r["removed"])] for r in report.get("regroup", [])]


def _title(report: dict) -> str:
    target = report["target"]
    return (f"{report['arch']} — {Path(report['checkpoint']).name} (round {report['round']}, {report['stage']}); "
            f"pattern {report['pattern']}, criterion {report['criterion']}, "
            f"target {_pct(target) if isinstance(target, (int, float)) else target}")


def outcome(report: dict, run: RunDir | None, path: Path, meta: dict) -> dict:
    """The reported checkpoint's sparsity and top-1, and the dense model's top-1 (None when not evaluated).

    top-1: the last history line of this checkpoint with a val_acc1, else its own metadata. Dense: the
    last evaluated history line of a model with no zero group (the dense training of round 0, or an
    eval of a dense checkpoint).
    """
    def top1(entry: dict):
        return (entry.get("metrics") or {}).get("val_acc1")

    history = run.history() if run else []
    mine = [top1(e) for e in history if e.get("checkpoint") == path.name and top1(e) is not None]
    dense = [top1(e) for e in history if e.get("sparsity") == 0 and top1(e) is not None]
    latest = run.latest() if run else None
    return {"checkpoint": path.name, "latest": latest is None or latest.name == path.name, "round": meta["round"],
            "sparsity": report["summary"]["sparsity of eligible weights"],
            "val_acc1": mine[-1] if mine else top1(meta), "dense_val_acc1": dense[-1] if dense else None}


def outcome_line(report: dict) -> str:
    """'final: 50.00% of eligible weights zero, top-1 100.00% (dense 98.89%), round 3'."""
    o = report.get("outcome")
    if not o:
        return ""
    top1 = f"top-1 {_pct_points(o['val_acc1'])}" if o["val_acc1"] is not None else "top-1 not evaluated"
    dense = f"dense {_pct_points(o['dense_val_acc1'])}" if o["dense_val_acc1"] is not None else "no dense evaluation"
    label = "final" if o["latest"] else Path(o["checkpoint"]).stem
    return f"{label}: {_pct(o['sparsity'])} of eligible weights zero, {top1} ({dense}), round {o['round']}"


def round_curves(run: RunDir) -> list[dict]:
    """Per round: epochs trained, first and last logged train loss, last val top-1."""
    from sparsify.training.log import read_rows

    rows: dict[int, dict] = {}
    for row in read_rows(run.root / "metrics.csv"):
        if not row.get("loss"):  # fp16 skipped every step of that row's window: no loss to show
            continue
        entry = rows.setdefault(int(row["round"]), {"round": int(row["round"]), "epochs": 0,
                                                   "first_loss": float(row["loss"]), "val_acc1": None})
        entry["last_loss"] = float(row["loss"])
    for entry in run.history():
        if entry.get("round") in rows and entry.get("stage") in ("trained", "final"):
            rows[entry["round"]]["epochs"] += (entry.get("metrics") or {}).get("epochs", 0)
            rows[entry["round"]]["val_acc1"] = (entry.get("metrics") or {}).get("val_acc1")
    return [rows[key] for key in sorted(rows)]


_WRAPPING = ("parameter", "parameter tensor", "site", "block sizes")  # the columns that give way, names first


def _table(title: str, head: list[str], rows: list[list[str]], *, width: int, left: tuple[str, ...] = ()):
    """A compact rich table (2 spaces between columns) for `width` columns: names and lists wrap, numbers do not.

    When the table is wider than `width`, the first wrapping column (the names) keeps its longest name
    whole if the other columns leave room, and the other wrapping columns share the rest.
    """
    from rich import box
    from rich.table import Table

    def widest(i: int) -> int:
        return max(len(line) for cell in [head[i], *(row[i] for row in rows)] for line in cell.split("\n"))

    def longest_word(i: int) -> int:
        return max(len(word) for cell in [head[i], *(row[i] for row in rows)] for word in cell.split() or [""])

    wrapping = [i for i, cell in enumerate(head) if cell in _WRAPPING]
    gaps = 2 * (len(head) - 1)
    fixed = {}  # column -> width, only when the table does not fit as it is
    numbers = sum(widest(i) for i in range(len(head)) if i not in wrapping)
    if numbers + gaps + 8 * len(wrapping) > width:  # a very narrow terminal: every column wraps, none is cut
        wrapping = list(range(len(head)))
    elif wrapping and sum(widest(i) for i in range(len(head))) + gaps > width:
        spare = width - gaps - sum(widest(i) for i in range(len(head)) if i not in wrapping)
        others = {i: min(widest(i), max(12, longest_word(i))) for i in wrapping[1:]}
        fixed[wrapping[0]] = max(8, min(widest(wrapping[0]), spare - sum(others.values())))
        left_over = spare - fixed[wrapping[0]]
        for i in wrapping[1:]:
            fixed[i] = max(others[i], left_over // len(others))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for i, head_cell in enumerate(head):
        table.add_column(head_cell, justify="left" if head_cell in left else "right", overflow="fold",
                         no_wrap=i not in wrapping, width=fixed.get(i))
    for row in rows:
        table.add_row(*row)
    return table


def render_table(report: dict, *, width: int | None = None) -> str:
    """Rich tables fitted to `width` columns (default: output_width()), then the outcome on one line."""
    from rich.console import Console

    buffer = io.StringIO()
    width = max(width or output_width(), 40)
    console = Console(file=buffer, width=width, color_system=None, highlight=False,
                      emoji=False, soft_wrap=False)
    console.print(_title(report), markup=False)
    layer_rows, reasons = _display_layers(report)
    sections = [[_table("layers", _LAYER_HEAD, layer_rows, width=width, left=("parameter", "shape", "eligible")),
                 *reasons, _LAYER_NOTE],
                [_table("summary", ["", "value"], _display_summary(report), width=width, left=("",))]]
    if report.get("tensors"):
        sections.append([_table("sparse tensors (dst breakdown)", _TENSOR_HEAD, _display_tensors(report), width=width,
                                left=("parameter tensor",))])
    if report.get("activations"):
        sections.append([_table("activation density (evaluation)", _ACTIVATION_HEAD, _display_activations(report),
                                width=width, left=("site", "kind"))])
    if report.get("regroup"):
        sections.append([_table("regroup (this round)", _REGROUP_HEAD, _display_regroup(report), width=width,
                                left=("parameter", "block sizes")), REGROUP_NOTE])
    notes = [f"constraint: {item['parameter']}: {item['note']}" for item in report["constraints"]]
    notes += permutation_lines(report.get("permutation"))
    if notes:
        sections.append(notes)
    if report["history"]:
        sections.append([_table("history", _HISTORY_HEAD, _display_history(report), width=width, left=("stage", "command"))])
    if report.get("rounds"):
        sections.append([_table("training per round (train loss of the first and last metrics.csv row)",
                                _ROUNDS_HEAD, _display_rounds(report), width=width)])
    for section in sections:
        console.print()
        for item in section:
            console.print(item, markup=False) if isinstance(item, str) else console.print(item)
    text = "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())
    return text + ("\n\n" + outcome_line(report) if outcome_line(report) else "")  # one line, never wrapped


def render_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in columns})
    return buffer.getvalue().rstrip()


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cell.replace("\n", " ") for cell in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    layer_rows, reasons = _display_layers(report)
    parts = [f"**{_title(report)}**", "", _markdown_table(_LAYER_HEAD, layer_rows), "",
             *[f"- {reason}" for reason in reasons], *([""] if reasons else []),
             _markdown_table(["summary", "value"], _display_summary(report))]
    if report.get("tensors"):
        parts += ["", _markdown_table(_TENSOR_HEAD, _display_tensors(report))]
    if report.get("activations"):
        parts += ["", _markdown_table(_ACTIVATION_HEAD, _display_activations(report))]
    if report.get("regroup"):
        parts += ["", _markdown_table(_REGROUP_HEAD, _display_regroup(report)), "", REGROUP_NOTE]
    if report["history"]:
        parts += ["", _markdown_table(_HISTORY_HEAD, _display_history(report))]
    if report.get("rounds"):
        parts += ["", _markdown_table(_ROUNDS_HEAD, _display_rounds(report))]
    if outcome_line(report):
        parts += ["", outcome_line(report)]
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
