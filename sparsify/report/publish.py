"""`sparsify report` from start to end: check where it writes, build the report, draw the figures when
they are asked for (--plot DIR, --format html), render and write.

Everything that can be refused is refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.io.files import atomic_write_bytes
from sparsify.io.outputs import first_existing, refuse_run_files, refuse_unwritable, run_file_problem
from sparsify.report.build import build_report, locate
from sparsify.report.plots import has_matplotlib, require_matplotlib
from sparsify.report.series import choose_layers


@dataclass
class Published:
    text: str | None  # the report for stdout; None when it went to a file
    messages: list[str] = field(default_factory=list)  # what was written or skipped (stderr)


def check_destinations(fmt: str, *, output: Path | None, plot_dir: Path | None, layers: str | None,
                       target: Path | None = None) -> None:
    """Refuse an output file or figure folder that cannot be written or that is one of the run's own files
    (the reported checkpoint, anything in checkpoints/, history.jsonl, ...), and --layers without figures."""
    if layers is not None and plot_dir is None and fmt != "html":
        raise SparsifyError("--layers chooses the mask pictures of --plot DIR and --format html; add one of them")
    source, run = locate(target) if target is not None else (None, None)
    inputs, runs = [source] if source else [], [run.root] if run else []
    if output is not None:
        if output.is_dir():
            raise SparsifyError(f"-o {output} is a folder; give a file name, e.g. -o {output / 'report.html'}")
        refuse_run_files(output, flag="-o", inputs=inputs, runs=runs)
        parent = first_existing(output.parent)
        if parent != output.parent and parent.is_dir():
            raise SparsifyError(f"-o {output}: the folder {output.parent} does not exist; create it first")
        refuse_unwritable(output.parent, flag="-o", given=output)
    if plot_dir is not None:
        if plot_dir.exists() and not plot_dir.is_dir():
            raise SparsifyError(f"--plot {plot_dir} is a file; give a folder for the figures (it is created if needed)")
        problem = run_file_problem(plot_dir / "figure.png", inputs=inputs, runs=runs)
        if problem:
            raise SparsifyError(f"--plot {plot_dir} {problem.replace('name a file', 'give a folder')} "
                                "(nothing was written)")
        refuse_unwritable(plot_dir, flag="--plot", given=plot_dir)


def run_config_text(report: dict) -> str | None:
    """The run's config.yaml as text (None for a checkpoint outside a run folder or without one)."""
    run = locate(Path(report["checkpoint"]))[1]
    path = run.root / "config.yaml" if run else None
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path else None
    except OSError:
        return None


def publish_report(target: Path, fmt: str, *, output: Path | None = None, plot_dir: Path | None = None,
                   layers: str | None = None) -> Published:
    """The report of `target` in `fmt` (table, json, csv, markdown, html), figures in `plot_dir` when given,
    masks drawn for the layers matching `layers` (default: the largest few)."""
    from sparsify.report.render import render

    check_destinations(fmt, output=output, plot_dir=plot_dir, layers=layers, target=target)
    if plot_dir is not None:
        require_matplotlib()
    if fmt not in ("table", "json", "csv", "markdown", "html"):
        raise SparsifyError(f"unknown report format {fmt!r}; choose table, json, csv, markdown or html")
    report = build_report(target)
    chosen = choose_layers(report["layers"], layers)
    published = Published(None)
    figures, notes, pngs = None, [], {}
    if plot_dir is not None or (fmt == "html" and has_matplotlib()):
        from sparsify.report.figures import report_figures, write_figures

        figures, notes = report_figures(report, layers=chosen)
        if plot_dir is not None:
            pngs = write_figures(figures, plot_dir)
            count = f"{len(figures)} figure" + ("s" if len(figures) != 1 else "")
            published.messages += [f"wrote {count} to {plot_dir} (PNG and SVG each)", *notes]
    if fmt == "html":
        from sparsify.report.figures import png_bytes
        from sparsify.report.html import render_html

        shown = ([(f.name, f.title, pngs.get(f.name) or png_bytes(f.figure)) for f in figures]
                 if figures is not None else None)
        text = render_html(report, figures=shown, notes=notes, config_text=run_config_text(report))
    else:
        text = render(report, fmt)
    if output is None:
        published.text = text
    else:
        atomic_write_bytes(output, (text if text.endswith("\n") else text + "\n").encode("utf-8"))
        published.messages.append(f"wrote {output}")
    return published
