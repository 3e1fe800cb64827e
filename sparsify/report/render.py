"""Rendering a report: a table that fits the terminal (rich), JSON, CSV or markdown, ending with the
outcome line."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.report.bench import compaction_lines, human
from sparsify.report.build import LAYER_COLUMNS, REGROUP_NOTE

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
_ROUNDS_NOTE = "first loss, last loss: train loss of the round's first and last metrics.csv row"
_LAYER_NOTE = ("sparsity: zeroed weights of the layer; this round: share of its groups zeroed by this "
               "checkpoint's prune round")


def _has_targets(report: dict) -> bool:
    """Whether the layers have their own targets (sparsity.layers / allocation): a `target` column."""
    return any(r.get("target") is not None for r in report["layers"])


def _layer_head(report: dict) -> list[str]:
    return _LAYER_HEAD[:4] + ["target"] + _LAYER_HEAD[4:] if _has_targets(report) else _LAYER_HEAD


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
        if _has_targets(report):
            rows[-1].insert(4, "" if r.get("target") is None else _pct(r["target"]))
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


def outcome_line(report: dict) -> str:
    """'final: 50.00% of eligible weights zero, top-1 100.00% (dense 98.89%), round 3'."""
    o = report.get("outcome")
    if not o:
        return ""
    top1 = f"top-1 {_pct_points(o['val_acc1'])}" if o["val_acc1"] is not None else "top-1 not evaluated"
    dense = f"dense {_pct_points(o['dense_val_acc1'])}" if o["dense_val_acc1"] is not None else "no dense evaluation"
    label = "final" if o["latest"] else Path(o["checkpoint"]).stem
    return f"{label}: {_pct(o['sparsity'])} of eligible weights zero, {top1} ({dense}), round {o['round']}"


_WRAPPING = ("parameter", "parameter tensor", "site", "block sizes")  # the columns that give way, names first
_DOTTED = ("parameter", "parameter tensor", "site")  # dotted module paths: broken after a '.' where they wrap


def break_at_dots(name: str, width: int) -> str:
    """`name` in lines of at most `width` characters, each broken after a '.' where one is in reach
    (`features.1.0.block.0.0.` / `weight` rather than `features.1.0.block.0.0.wei` / `ght`)."""
    lines, line = [], ""
    for part in re.split(r"(?<=\.)", name):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
        while len(line) > width:
            lines.append(line[:width])
            line = line[width:]
    return "\n".join([*lines, line] if line else lines)


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
        table.add_row(*(break_at_dots(cell, fixed[i]) if i in fixed and head[i] in _DOTTED else cell
                        for i, cell in enumerate(row)))
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
    sections = [[_table("layers", _layer_head(report), layer_rows, width=width, left=("parameter", "shape", "eligible")),
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
    compaction = report.get("compaction") or {}
    if compaction.get("layers"):
        sections.append([_table("compaction (export --compact)", _COMPACTION_HEAD, _display_compaction(compaction),
                                width=width, left=("layer", "shape"))])
    notes = [f"constraint: {item['parameter']}: {item['note']}" for item in report["constraints"]]
    notes += compaction_lines(report.get("compaction"))
    notes += channel_macs_lines(report.get("channel_macs"))
    notes += permutation_lines(report.get("permutation"))
    notes += bn_recalibration_lines(report.get("bn_recalibration"))
    notes += bench_lines(report.get("bench"))
    notes += [f"could not read: {problem}" for problem in report.get("problems", [])]
    if notes:
        sections.append(notes)
    if report["history"]:
        sections.append([_table("history", _HISTORY_HEAD, _display_history(report), width=width, left=("stage", "command"))])
    if report.get("rounds"):
        sections.append([_table("training per round", _ROUNDS_HEAD, _display_rounds(report), width=width),
                         _ROUNDS_NOTE])
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
    parts = [f"**{_title(report)}**", "", _markdown_table(_layer_head(report), layer_rows), "",
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
    if report.get("bench"):
        parts += ["", *[f"- {line.strip()}" for line in bench_lines(report["bench"])]]
    if outcome_line(report):
        parts += ["", outcome_line(report)]
    return "\n".join(parts)


_COMPACTION_HEAD = ["layer", "shape", "params", "multiply-adds"]


def channel_macs_lines(record: dict | None) -> list[str]:
    """Scope global of pattern channel: the share of multiply-adds removed against the target."""
    if not record:
        return []
    return [f"scope global: {record['removed']:.1%} of the multiply-adds removed (target {record['target']:.0%}; "
            f"{human(record['dense'])} -> {human(record['compact'])} per image)"]


def _display_compaction(compaction: dict) -> list[list[str]]:
    return [[row["layer"], f"{'x'.join(map(str, row['shape_before']))} -> {'x'.join(map(str, row['shape_after']))}",
             f"{human(row['params_before'])} -> {human(row['params_after'])}",
             f"{human(row['macs_before'])} -> {human(row['macs_after'])}"] for row in compaction["layers"]]


def bench_lines(bench: dict | None) -> list[str]:
    """The latest `sparsify bench` of the run in a few lines: end-to-end medians against dense."""
    if not bench:
        return []
    lines = [f"bench ({bench['checkpoint']}, {bench['device']}, {bench['threads']} thread(s)): "
             f"{bench['sparse_layers']} of {bench['layers']} layer timings run sparse; multiply-adds on kept "
             f"weights {bench['mac_ratio']:.1%} of dense"]
    for row in bench["end_to_end"]:
        lines.append(f"  batch {row['batch']} {row['model']}: {row['median_ms']:.2f} ms, {row['images_per_s']:.1f} "
                     f"images/s, {row['vs_dense']:.3f}x dense's time")
    return lines


def bn_recalibration_lines(record: dict | None) -> list[str]:
    """'BatchNorm re-estimated on N batches (K layers)', with prune --eval's top-1 before and after."""
    if not record:
        return []
    shown = (f"; val top-1 {record['val_acc1_before']:.2f}% before, {record['val_acc1_after']:.2f}% after"
             if "val_acc1_after" in record else "")
    return [f"BatchNorm re-estimated on {record['batches']} batches ({record['layers']} layers){shown}"]


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
