"""The report as one self-contained HTML file: the outcome, summary, figures (inline PNG), round history,
a sortable per-layer table, the other sections of the report and the run's config.

No network and no script library: styles and a few lines of sorting script are inline. Everything that
comes from files is HTML-escaped. Sections this module does not know (added to the report later) are
shown as generic tables.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from sparsify import __version__
from sparsify.report.render import (
    _ACTIVATION_HEAD, _HISTORY_HEAD, _LAYER_NOTE, _REGROUP_HEAD, _ROUNDS_HEAD, _ROUNDS_NOTE, _TENSOR_HEAD, _display_activations,
    _display_history, _display_layers, _display_regroup, _display_rounds, _display_summary, _display_tensors,
    _layer_head, _title, bench_lines, bn_recalibration_lines, outcome_line, permutation_lines,
)
from sparsify.report.build import REGROUP_NOTE

NO_PLOTS = "Figures need matplotlib: pip install 'sparsify-cnn[plot]' and make the report again."
SHOWN = {"checkpoint", "arch", "round", "stage", "pattern", "criterion", "target", "layers", "summary", "tensors",
         "constraints", "regroup", "history", "rounds", "problems", "permutation", "bn_recalibration",
         "activations", "bench", "outcome"}  # the keys with a section of their own (or in the title)

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:1150px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:2px solid #3b6ea5;padding-bottom:.2em;
margin-top:2em}
.outcome{font-size:1.15em;background:#eef3f9;border-left:4px solid #3b6ea5;padding:.6em 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{padding:.25em .7em;border-bottom:1px solid #e2e2e2;text-align:right;white-space:nowrap}
th{background:#f4f4f4;font-weight:600}td.text,th.text{text-align:left}
table.sortable th{cursor:pointer}table.sortable th:after{content:' \\2195';color:#aaa}
tr.ineligible td{color:#888}
.figures{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0;flex:0 1 auto;max-width:100%}\nfigure.small{flex:0 1 auto;max-width:calc(50% - .5em)}figure img{max-width:100%;border:1px solid #eee}\nnav a{margin-right:1em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em}.warn{color:#a33}
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== '1';
      var key = function (row) {
        var text = row.cells[column].textContent.trim(), n = parseFloat(text.replace(/[,%+x]/g, ''));
        return isNaN(n) || !/^[-+\\d.,%x ]+$/.test(text) ? text.toLowerCase() : n; };
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
      th.dataset.up = up ? '1' : '0';
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def table(head: list[str], rows: list[list[str]], *, left: tuple[str, ...] = (), sortable: bool = False,
          row_classes: list[str] | None = None, table_id: str | None = None) -> str:
    """An HTML table of text cells (escaped); `left` names the columns aligned left."""
    def cell(tag: str, text: str, column: str) -> str:
        kind = ' class="text"' if column in left else ""
        return f"<{tag}{kind}>{escape(str(text)).replace(chr(10), '<br>')}</{tag}>"

    head_html = "".join(cell("th", h, h) for h in head)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{css}>" + "".join(cell("td", value, h) for h, value in zip(head, row)) + "</tr>")
    attributes = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    return f"<table{attributes}><thead><tr>{head_html}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(key: str, title: str, *parts: str) -> str:
    return f'<section id="{escape(key)}"><h2>{escape(title)}</h2>{"".join(parts)}</section>'


def paragraphs(lines: list[str], css: str = "note") -> str:
    return "".join(f'<p class="{css}">{escape(line)}</p>' for line in lines)


def layers_section(report: dict) -> str:
    rows, reasons = _display_layers(report)
    classes = ["" if r["eligible"] == "yes" else "ineligible" for r in report["layers"]]
    return section("layers", f"layers ({len(rows)})",
                   table(_layer_head(report), rows, left=("parameter", "shape", "eligible"), sortable=True,
                         row_classes=classes, table_id="layer-table"),
                   paragraphs(reasons + [_LAYER_NOTE + "; click a column to sort"]))


def figures_section(figures: list[tuple[str, str, bytes]] | None, notes: list[str]) -> str:
    """Inline PNG figures (mask pictures side by side), or the line saying figures need the [plot] extra
    (figures None)."""
    if figures is None:
        return section("figures", "figures", paragraphs([NO_PLOTS]))
    small = ' class="small"'
    items = [f'<figure id="figure-{escape(name)}"{small if name.startswith("mask-") else ""}>'
             f'<img alt="{escape(title)}" title="{escape(title)}" src="data:image/png;base64,'
             f'{base64.b64encode(png).decode()}"></figure>' for name, title, png in figures]
    return section("figures", "figures", '<div class="figures">', *items, "</div>", paragraphs(notes))


def notes_section(report: dict) -> str:
    notes = [f"constraint: {item['parameter']}: {item['note']}" for item in report.get("constraints", [])]
    notes += permutation_lines(report.get("permutation"))
    notes += bn_recalibration_lines(report.get("bn_recalibration"))
    problems = [f"could not read: {problem}" for problem in report.get("problems", [])]
    return section("notes", "notes", paragraphs(notes), paragraphs(problems, "warn")) if notes or problems else ""


def history_tables(report: dict) -> list[str]:
    """The round history and the training per round (when the run has them)."""
    parts = []
    if report.get("history"):
        parts.append(section("history", "round history", table(_HISTORY_HEAD, _display_history(report),
                                                                left=("stage", "command"))))
    if report.get("rounds"):
        parts.append(section("rounds", "training per round", table(_ROUNDS_HEAD, _display_rounds(report)),
                             paragraphs([_ROUNDS_NOTE])))
    return parts


def detail_tables(report: dict) -> list[str]:
    """dst breakdown, activation density, regroup and bench (when the report has them)."""
    parts = []
    if report.get("tensors"):
        parts.append(section("tensors", "sparse tensors (dst breakdown)",
                             table(_TENSOR_HEAD, _display_tensors(report), left=("parameter tensor",))))
    if report.get("activations"):
        parts.append(section("activations", "activation density (evaluation)",
                             table(_ACTIVATION_HEAD, _display_activations(report), left=("site", "kind"))))
    if report.get("regroup"):
        parts.append(section("regroup", "regroup (this round)", table(
            _REGROUP_HEAD, _display_regroup(report), left=("parameter", "block sizes")), paragraphs([REGROUP_NOTE])))
    if report.get("bench"):
        parts.append(section("bench", "bench", paragraphs([line.strip() for line in bench_lines(report["bench"])])))
    return parts


def generic_value(value) -> str:
    """A section this module does not know: a list of records as a table, a mapping as key/value rows."""
    def text(item) -> str:
        return item if isinstance(item, str) else json.dumps(item)

    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        head = list(dict.fromkeys(key for item in value for key in item))
        return table(head, [[text(item.get(key, "")) for key in head] for item in value], left=tuple(head))
    if isinstance(value, dict):
        return table(["key", "value"], [[str(k), text(v)] for k, v in value.items()], left=("key", "value"))
    return f"<pre>{escape(text(value))}</pre>"


def other_sections(report: dict) -> list[str]:
    return [section(f"extra-{key}", str(key), generic_value(value)) for key, value in report.items()
            if key not in SHOWN and value not in (None, [], {}, "")]


def config_section(config_text: str | None) -> str:
    body = f"<pre>{escape(config_text)}</pre>" if config_text else paragraphs(["no run folder: no config.yaml"])
    return section("config", "config (config.yaml of the run)", body)


def contents(parts: list[str]) -> str:
    """Links to the sections (their ids and titles are in each part's opening tags)."""
    links = []
    for part in parts:
        key = part.split('id="', 1)[1].split('"', 1)[0]
        title = part.split("<h2>", 1)[1].split("</h2>", 1)[0]
        links.append(f'<a href="#{key}">{title}</a>')
    return f"<nav>{''.join(links)}</nav>"


def render_html(report: dict, *, figures: list[tuple[str, str, bytes]] | None, notes: list[str] = (),
                config_text: str | None = None) -> str:
    """The whole page. `figures`: (name, title, PNG bytes) each, or None when matplotlib is missing."""
    title = _title(report)
    summary = section("summary", "summary", table(["", "value"], _display_summary(report), left=("",)))
    parts = [summary, *history_tables(report), figures_section(figures, list(notes)), layers_section(report),
             *detail_tables(report), notes_section(report), *other_sections(report), config_section(config_text)]
    parts = [part for part in parts if part]
    body = [f"<h1>{escape(title)}</h1>", f'<p class="outcome">{escape(outcome_line(report) or "no outcome")}</p>',
            contents(parts), *parts,
            f'<p class="note">sparsify {escape(__version__)}; checkpoint {escape(str(report["checkpoint"]))}</p>']
    page_title = f"sparsify report: {report['arch']} {Path(str(report['checkpoint'])).name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(page_title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(part for part in body if part)
            + f"\n<script>{SORT_SCRIPT}</script></body></html>\n")
